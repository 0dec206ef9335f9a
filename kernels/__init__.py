"""DSA kernels. Each op has a PyTorch reference (the CPU path and the oracle) and, on CUDA, a Triton kernel.

The model calls the dispatching names below; they pick Triton on CUDA tensors and the reference otherwise.
"""

from kernels.indexer import indexer_scores, indexer_scores_reference
from kernels.indexer_loss import indexer_kl_loss, indexer_kl_loss_reference
from kernels.sparse_mla import sparse_mla_attention, sparse_mla_attention_reference
from kernels.topk import topk_indices, topk_indices_reference

__all__ = [
    "indexer_kl_loss",
    "indexer_kl_loss_reference",
    "indexer_scores",
    "indexer_scores_reference",
    "sparse_mla_attention",
    "sparse_mla_attention_reference",
    "topk_indices",
    "topk_indices_reference",
]
