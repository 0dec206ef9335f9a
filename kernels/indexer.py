"""Lightning indexer scores: I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]), causal.

DeepSeek-V3.2 section 2.1. The scales (index_head_dim^-0.5 on q.k and index_n_heads^-0.5 on the
head weights) are folded into `w` by the caller: ReLU(c * x) = c * ReLU(x) for c > 0.
"""

from __future__ import annotations

import torch


def causal_mask(t_len: int, s_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S], True where key s is visible to query t. Queries are the last T of S positions."""
    offset = s_len - t_len
    t = torch.arange(t_len, device=device)[:, None] + offset
    s = torch.arange(s_len, device=device)[None, :]
    return s <= t


def indexer_scores_reference(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Index scores in fp32, -inf at non-causal positions.

    q: [B, T, H, D] indexer queries, k: [B, S, D] indexer keys (one per token, shared by the heads),
    w: [B, T, H] head weights (scales folded in). Returns [B, T, S]; queries are the last T of S tokens.
    """
    logits = torch.einsum("bthd,bsd->bths", q.float(), k.float()).relu()
    scores = torch.einsum("bths,bth->bts", logits, w.float())
    visible = causal_mask(q.shape[1], k.shape[1], q.device)
    return scores.masked_fill(~visible, float("-inf"))


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere. Same contract as the reference."""
    if q.is_cuda:
        from kernels.indexer_triton import indexer_scores_triton

        return indexer_scores_triton(q, k, w)
    return indexer_scores_reference(q, k, w)
