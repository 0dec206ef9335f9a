"""The lightning indexer's training loss (DeepSeek-V3.2 section 2.1.1).

Target p_t: the main attention distribution at query t summed over heads and L1-normalised.
Dense warm-up:  L = sum_t KL(p_t || softmax(I_t))            over all causal positions.
Sparse stage:   L = sum_t KL(p_t|S_t || softmax(I_t|S_t))     restricted to the selected set S_t.
The target is computed from detached attention inputs, so only the indexer receives gradient.
"""

from __future__ import annotations

import torch

from kernels.indexer import causal_mask
from kernels.topk import selection_mask


def indexer_kl_loss_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float,
    index_scores: torch.Tensor,
    indices: torch.Tensor | None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over (unmasked) queries of KL(p_t || softmax(I_t)); the sum over t divided by the count.

    q: [B, T, H, Dk] and kv: [B, S, Dk] as for `sparse_mla_attention` (treated as constants),
    index_scores: [B, T, S] with -inf at non-causal positions, indices: [B, T, K] for the sparse
    stage or None for the dense warm-up, query_mask: [B, T] (1 = count this query) or None.
    """
    with torch.no_grad():
        visible = causal_mask(q.shape[1], kv.shape[1], q.device)[None].expand(q.shape[0], -1, -1)
        if indices is not None:
            visible = visible & selection_mask(indices, kv.shape[1])
        scores = (torch.einsum("bthd,bsd->bths", q.float(), kv.float()) * scale)
        probs = scores.masked_fill(~visible[:, :, None, :], float("-inf")).softmax(-1)
        target = probs.sum(2)
        target = target / target.sum(-1, keepdim=True)
    log_index = index_scores.float().masked_fill(~visible, float("-inf")).log_softmax(-1)
    # KL(p || q) = sum p (log p - log q); positions with p = 0 contribute 0 (avoid 0 * -inf).
    log_target = torch.where(target > 0, target.log(), torch.zeros_like(target))
    terms = torch.where(target > 0, target * (log_target - log_index), torch.zeros_like(target))
    kl = terms.sum(-1)
    if query_mask is None:
        return kl.mean()
    query_mask = query_mask.to(kl.dtype)
    return (kl * query_mask).sum() / query_mask.sum().clamp(min=1)


def indexer_kl_loss(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float,
    index_scores: torch.Tensor,
    indices: torch.Tensor | None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere. Same contract as the reference."""
    if q.is_cuda:
        from kernels.indexer_loss_triton import indexer_kl_loss_triton

        return indexer_kl_loss_triton(q, kv, scale, index_scores, indices, query_mask)
    return indexer_kl_loss_reference(q, kv, scale, index_scores, indices, query_mask)
