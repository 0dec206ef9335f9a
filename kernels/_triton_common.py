"""Shared pieces of keel's Triton kernels: the interpreter switch, the target, one matmul helper.

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


#: The target the tile choices are made for when the tensors are not on a GPU (the interpreter; the compile
#: report's meta tensors, which sets it per target): compute capability x 10, 90 = Hopper, 100 = Blackwell.
TARGET_ARCH: int = 90


def target_arch(device: torch.device) -> int:
    """Compute capability x 10 of the GPU a launch on `device` runs on (TARGET_ARCH off the GPU)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return TARGET_ARCH


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
