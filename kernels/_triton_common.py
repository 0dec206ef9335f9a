"""Shared pieces of keel's Triton kernels: the interpreter switch and one matmul helper.

Triton decides at decoration time whether `@triton.jit` functions run compiled (GPU) or in the numpy
interpreter (`TRITON_INTERPRET=1`, how CI tests the kernels on CPU), so the flag is read at import.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: True when kernels run in Triton's numpy interpreter (CPU tensors allowed).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path can take these tensors: CUDA tensors, or any tensor under the interpreter."""
    return INTERPRET or all(t.is_cuda for t in tensors)


def pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum); tile sides must be powers of two and tl.dot wants >= 16."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def mma(a, b, acc, INTERP: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    In the interpreter, Triton 3.9's bf16 x bf16 dot returns garbage (seen: errors of 1e10), so both
    operands are widened to fp32 there; on the GPU the tensor cores take bf16/fp8 directly. IEEE asks
    for exact fp32 products (fp32 inputs), otherwise the GPU would round fp32 operands to tf32.
    """
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
