"""Top-k token selection for DSA: each query keeps the index_topk earlier tokens with the highest score."""

from __future__ import annotations

import torch


def topk_indices_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, T, min(k, S)] (int64) of the k best causal positions per query; -1 in unused slots.

    scores: [B, T, S] with -inf at non-causal positions (as `indexer_scores` returns). A query with
    fewer than k visible tokens selects all of them; the remaining slots are -1. Ties are broken
    arbitrarily (ReLU sums tie at exactly 0 often), so compare selections as sets of scores.
    """
    k = min(k, scores.shape[-1])
    values, idx = scores.topk(k, dim=-1)
    return idx.masked_fill(values == float("-inf"), -1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere."""
    if scores.is_cuda:
        from kernels.topk_triton import topk_indices_triton

        return topk_indices_triton(scores, k)
    return topk_indices_reference(scores, k)


def selection_mask(indices: torch.Tensor, s_len: int) -> torch.Tensor:
    """Boolean [B, T, S] that is True at the selected positions (slots holding -1 are ignored)."""
    mask = torch.zeros(*indices.shape[:-1], s_len + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices.masked_fill(indices < 0, s_len), True)
    return mask[..., :s_len]
