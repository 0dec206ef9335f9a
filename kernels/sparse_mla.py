"""Sparse MLA attention in the shared-latent (MQA) form.

Every query head attends over the same per-token entry kv[s] = [c_kv(s) | k_rope(s)] (576 wide at
full size); the value is the latent part c_kv(s) = kv[s, :dv]. With W_UK absorbed into the queries
and W_UV applied after, this equals MLA: o_t,h = sum_{s in S_t} softmax_s(scale * q_t,h . kv_s) c_kv(s).
"""

from __future__ import annotations

import torch

from kernels.indexer import causal_mask
from kernels.topk import selection_mask


def sparse_mla_attention_reference(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor | None, scale: float, dv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to the selected positions; returns (out [B, T, H, dv], lse [B, T, H]).

    q: [B, T, H, Dk], kv: [B, S, Dk], indices: [B, T, K] from `topk_indices` (-1 = unused), or None
    for dense causal attention. Queries are the last T of the S positions. lse is the natural-log
    log-sum-exp of the scaled scores over the attended set (what a kernel saves for backward).
    """
    scores = torch.einsum("bthd,bsd->bths", q, kv) * scale
    visible = causal_mask(q.shape[1], kv.shape[1], q.device)[None]
    if indices is not None:
        visible = visible & selection_mask(indices, kv.shape[1])
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.exp(scores.float() - lse[..., None]).to(q.dtype)
    out = torch.einsum("bths,bsd->bthd", probs, kv[..., :dv])
    return out, lse


def sparse_mla_attention(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor | None, scale: float, dv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: Triton on CUDA, the reference elsewhere. Same contract as the reference.

    On CUDA the returned lse carries no gradient (it is the kernel's saved state).
    """
    if q.is_cuda:
        from kernels.sparse_mla_triton import sparse_mla_attention_triton

        return sparse_mla_attention_triton(q, kv, indices, scale, dv)
    return sparse_mla_attention_reference(q, kv, indices, scale, dv)
