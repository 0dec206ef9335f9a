"""Compile report: every Triton kernel in kernels/, compiled for Hopper and Blackwell at DeepSeek-V3.2's shapes.

No GPU is needed. Triton compiles for an NVIDIA target on any machine, with the ptxas its wheel ships,
and the cubin tells what the kernel will cost on the chip. For each kernel launch and target it prints:
shared memory per program, registers per thread, spill bytes (stored/loaded, whole kernel) and spill
instructions inside loops (the main loop's are the ones that cost), warps and pipeline stages, the tile
sizes, and which MMA instruction carries the tl.dot products (Hopper's warp-group MMA `wgmma`,
Blackwell's `tcgen05`, or the older warp-level `mma.sync`).

    python bench/kernel_report.py                        # sm_90 and sm_100, table on stdout
    python bench/kernel_report.py --arch 90 --json r.json

How a kernel is compiled exactly as the launcher would launch it: each case below calls the real
launcher in kernels/*_triton.py on meta tensors (shapes, strides and dtypes, no memory) while every
Triton kernel's `run` is swapped for a recorder, so the launcher's own choice of tile sizes, warps and
stages is what gets compiled. The recorded arguments go through Triton's own binder (the code a launch
runs to specialise on pointer alignment, integers equal to 1 or divisible by 16), then
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`. Registers and the stack frame come
from `cuobjdump -res-usage` on that cubin; spills are its local-memory instructions (STL/LDL: the byte
totals equal `ptxas -v`'s spill stores/loads) and a spill counts as in a loop when it lies between a
backward branch and its target. Triton's cache (~/.triton/cache, TRITON_CACHE_DIR) keeps compiled
kernels, so a second run only re-reads the cubins.

The shapes (bench/dsa_kernels.py's `Shapes`): 128 query heads, 576-wide MLA entries with 512-wide values,
indexer 64 heads x 128, top-k 2048; prefill chunks of 4096 queries over 8192 keys, and one decode query.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

# The kernels must be compiled, not interpreted: Triton reads this when the kernels are decorated.
os.environ["TRITON_INTERPRET"] = "0"
# Triton 3.9's default (FP fusion on), said explicitly: unset, it warns once per compiling process.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import triton  # noqa: E402
from dsa_kernels import Shapes  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

#: Largest shared memory one program may use (opt-in dynamic shared memory per block), by target.
#: H100/H200 (sm_90) and B200 (sm_100) both allow 227 KB.
SHARED_LIMIT: dict[int, int] = {90: 227 * 1024, 100: 227 * 1024}
ARCH_NAMES: dict[int, str] = {90: "sm_90a (H100/H200)", 100: "sm_100a (B200)"}
KERNEL_MODULES = ("kernels.sparse_mla_triton", "kernels.indexer_triton", "kernels.indexer_loss_triton",
                  "kernels.topk_triton")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# ----------------------------------------------------------------------------------------------------------
# Cases: one launcher call each, on meta tensors at V3.2 shapes
# ----------------------------------------------------------------------------------------------------------

SHAPES = Shapes()
CHUNK, KEYS = 4096, 8192  # a prefill chunk of queries over the keys so far (bench/dsa_kernels.py's chunking)


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _mla_inputs(t_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sh = SHAPES
    return (_meta(1, t_len, sh.heads, sh.dk), _meta(1, KEYS, sh.dk),
            _meta(1, t_len, sh.topk, dtype=torch.int64))


def _indexer_inputs(t_len: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    sh = SHAPES
    return (_meta(1, t_len, sh.index_heads, sh.index_dim, dtype=dtype), _meta(1, KEYS, sh.index_dim, dtype=dtype),
            _meta(1, t_len, sh.index_heads, dtype=torch.float32))


def case_sparse_mla_fwd() -> None:
    from kernels.sparse_mla_triton import _launch_forward

    q, kv, idx = _mla_inputs(CHUNK)
    _launch_forward(q, kv, idx, SHAPES.dk**-0.5, SHAPES.dv)


def case_sparse_mla_bwd() -> None:
    from kernels.sparse_mla_triton import _launch_backward

    q, kv, idx = _mla_inputs(CHUNK)
    out = _meta(1, CHUNK, SHAPES.heads, SHAPES.dv)
    lse = _meta(1, CHUNK, SHAPES.heads, dtype=torch.float32)
    _launch_backward(q, kv, idx, SHAPES.dk**-0.5, SHAPES.dv, out, lse, out)


def case_attention_lse_sparse() -> None:
    from kernels.sparse_mla_triton import attention_lse

    q, kv, idx = _mla_inputs(CHUNK)
    attention_lse(q, kv, idx, SHAPES.dk**-0.5)


def case_attention_lse_dense() -> None:
    from kernels.sparse_mla_triton import attention_lse

    q, kv, _ = _mla_inputs(CHUNK)
    attention_lse(q, kv, None, SHAPES.dk**-0.5)


def case_indexer_fwd_prefill() -> None:
    from kernels.indexer_triton import _launch_forward

    _launch_forward(*_indexer_inputs(CHUNK), None)


def case_indexer_fwd_decode() -> None:
    from kernels.indexer_triton import _launch_forward

    _launch_forward(*_indexer_inputs(1), None)


def case_indexer_fwd_fp8() -> None:
    from kernels.indexer_triton import _launch_forward

    q, k, w = _indexer_inputs(CHUNK, torch.float8_e4m3fn)
    _launch_forward(q, k, w, _meta(1, KEYS, dtype=torch.float32))


def case_indexer_bwd() -> None:
    from kernels.indexer_triton import _launch_backward

    q, k, w = _indexer_inputs(CHUNK)
    _launch_backward(q, k, w, _meta(1, CHUNK, KEYS, dtype=torch.float32))


def _kl_case(sparse: bool) -> None:
    from kernels.indexer_loss_triton import launch_kl_backward, launch_kl_forward

    q, kv, idx = _mla_inputs(CHUNK)
    scores = _meta(1, CHUNK, KEYS, dtype=torch.float32)
    lse = _meta(1, CHUNK, SHAPES.heads, dtype=torch.float32)  # the attention forward's, passed in
    saved = launch_kl_forward(q, kv, SHAPES.dk**-0.5, scores, idx if sparse else None, lse)
    launch_kl_backward(saved, _meta(1, CHUNK, dtype=torch.float32))


def case_indexer_kl_sparse() -> None:
    _kl_case(sparse=True)


def case_indexer_kl_dense() -> None:
    _kl_case(sparse=False)


def case_topk() -> None:
    from kernels.topk_triton import topk_indices_triton

    topk_indices_triton(_meta(1, CHUNK, KEYS, dtype=torch.float32), SHAPES.topk)


CASES: dict[str, Callable[[], None]] = {
    "sparse_mla fwd": case_sparse_mla_fwd,
    "sparse_mla bwd": case_sparse_mla_bwd,
    "attention_lse sparse": case_attention_lse_sparse,
    "attention_lse dense": case_attention_lse_dense,
    "indexer fwd prefill": case_indexer_fwd_prefill,
    "indexer fwd decode": case_indexer_fwd_decode,
    "indexer fwd fp8": case_indexer_fwd_fp8,
    "indexer bwd": case_indexer_bwd,
    "indexer_kl sparse": case_indexer_kl_sparse,
    "indexer_kl dense": case_indexer_kl_dense,
    "topk": case_topk,
}

# ----------------------------------------------------------------------------------------------------------
# Capturing launches
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)`; `config` holds one autotune config's kwargs, if any."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    config: dict = field(default_factory=dict)


def kernel_objects() -> dict[str, JITFunction | Autotuner]:
    """Every launchable Triton kernel of kernels/ (by convention the jit functions named *_kernel)."""
    import importlib

    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if isinstance(obj, (JITFunction, Autotuner)) and attr.endswith("_kernel"):
                found[attr] = obj
    return found


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, kernel launches are recorded instead of run (an autotuned kernel: every config)."""
    launches: list[Launch] = []
    kernels = kernel_objects()

    def recorder(obj: JITFunction | Autotuner) -> Callable:
        def run(*args, grid, warmup=False, **kwargs):
            if isinstance(obj, Autotuner):
                for cfg in obj.configs:
                    launches.append(Launch(obj.fn, args, {**kwargs, **cfg.all_kwargs()}, cfg.all_kwargs()))
            else:
                launches.append(Launch(obj, args, kwargs))

        return run

    for obj in kernels.values():
        obj.run = recorder(obj)  # an instance attribute shadows the class's run, which launches
    try:
        yield launches
    finally:
        for obj in kernels.values():
            del obj.run


@cache
def case_launches(case: str, arch: int) -> list[Launch]:
    """The launches of one case, with the tiles its launchers choose for the target `arch`."""
    import kernels._triton_common as common

    common.TARGET_ARCH = arch  # meta tensors are not on a GPU: the launchers read the target from here
    with recording() as launches:
        CASES[case]()
    return launches


# ----------------------------------------------------------------------------------------------------------
# Compiling and reading the cubin
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    kernel: str
    arch: int
    config: dict = field(default_factory=dict)  # the tile sizes (BLOCK_* constexprs)
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0  # bytes per program
    registers: int = 0  # per thread
    stack: int = 0  # bytes of local memory per thread (spill slots)
    spill_stores: int = 0  # bytes, static (ptxas -v's "spill stores")
    spill_loads: int = 0
    loop_spills: int = 0  # STL/LDL instructions inside a loop
    mma: str = "-"  # wgmma | tcgen05 | mma.sync | -
    compile_s: float = 0.0
    error: str = ""


def compile_launch(launch: Launch, arch: int):
    """triton.compile of the recorded launch for cuda:arch, specialised as a real launch would be."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.kwargs, "debug": False}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


_BRANCH = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T\d]+\s+)?BRA(?:\.[\w.]+)?\s+0x([0-9a-f]+)")
_LOCAL = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T\d]+\s+)?(STL|LDL)(\.[\w.]+)?\s")
_WIDTH = {".64": 8, ".128": 16, ".U8": 1, ".S8": 1, ".U16": 2, ".S16": 2}


def read_cubin(cubin: bytes) -> dict[str, int]:
    """Registers, stack, spill bytes and in-loop spill instructions of a one-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    # Loops: a branch to a lower address closes one (a branch to itself is the end-of-kernel trap).
    loops = [(int(dst, 16), int(src, 16)) for src, dst in _BRANCH.findall(sass) if int(dst, 16) < int(src, 16)]
    stores = loads = in_loop = 0
    for addr, op, suffix in _LOCAL.findall(sass):
        width = _WIDTH.get((suffix or "").replace(".LU", "") or "", 4)
        if op == "STL":
            stores += width
        else:
            loads += width
        if any(lo <= int(addr, 16) <= hi for lo, hi in loops):
            in_loop += 1
    return dict(registers=int(regs.group(1)) if regs else 0, stack=int(stack.group(1)) if stack else 0,
                spill_stores=stores, spill_loads=loads, loop_spills=in_loop)


def mma_kind(ptx: str) -> str:
    for needle, name in (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync")):
        if needle in ptx:
            return name
    return "-"


def report_row(case: str, index: int, arch: int) -> Row:
    launch = case_launches(case, arch)[index]
    config = {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK") or k == "RADIX_BITS"}
    row = Row(case=case, kernel=launch.kernel.fn.__name__, arch=arch, config=config)
    start = time.perf_counter()
    try:
        compiled = compile_launch(launch, arch)
    except Exception as exc:  # a compile error is a result to report, not a crash of the report
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        return row
    row.compile_s = round(time.perf_counter() - start, 2)
    meta = compiled.metadata
    row.num_warps, row.num_stages, row.shared = meta.num_warps, meta.num_stages, meta.shared
    row.mma = mma_kind(compiled.asm["ptx"])
    for key, value in read_cubin(compiled.asm["cubin"]).items():
        setattr(row, key, value)
    return row


def _worker(job: tuple[str, int, int]) -> Row:
    return report_row(*job)


def build_report(archs: list[int], cases: list[str], jobs: int) -> tuple[list[Row], list[str]]:
    """Rows for every (case launch, arch), and the kernels of kernels/ that no case launches (when all run)."""
    work = [(case, i, arch) for case in cases for arch in archs for i in range(len(case_launches(case, arch)))]
    launched = {launch.kernel.fn.__name__ for case in cases for arch in archs for launch in case_launches(case, arch)}
    uncovered = sorted(set(kernel_objects()) - launched) if set(cases) == set(CASES) else []
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_worker, work))
    else:
        rows = [_worker(job) for job in work]
    return rows, uncovered


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def problems(row: Row) -> list[str]:
    """What the CI test fails on: a compile error, shared memory over the limit, spills in a loop."""
    found = []
    if row.error:
        found.append(f"compile error: {row.error}")
    elif row.shared > SHARED_LIMIT[row.arch]:
        found.append(f"shared memory {row.shared / 1024:.1f} KB > {SHARED_LIMIT[row.arch] // 1024} KB")
    elif row.loop_spills:
        found.append(f"{row.loop_spills} spill instructions in a loop")
    return found


def format_table(rows: list[Row]) -> str:
    head = "| case | kernel | arch | tiles | warps | stages | shared KB | regs | spill st/ld B | in loop | mma |"
    lines = [head, "| " + " | ".join("---" for _ in range(head.count("|") - 1)) + " |"]
    for r in rows:
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r.config.items())
        if r.error:
            lines.append(f"| {r.case} | {r.kernel} | {r.arch} | {tiles} | | | | | | | ERROR: {r.error} |")
            continue
        lines.append(
            f"| {r.case} | {r.kernel} | {r.arch} | {tiles} | {r.num_warps} | {r.num_stages} | "
            f"{r.shared / 1024:.1f} | {r.registers} | {r.spill_stores}/{r.spill_loads} | {r.loop_spills} | {r.mma} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,100", help="compute capabilities, comma-separated (90: Hopper, 100: B200)")
    p.add_argument("--cases", default="", help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiler processes")
    p.add_argument("--json", default="", help="also write the rows (and uncovered kernels) to this file")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    cases = [c.strip() for c in args.cases.split(",")] if args.cases else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; the cases are: {', '.join(CASES)}")
    start = time.perf_counter()
    rows, uncovered = build_report(archs, cases, args.jobs)
    print(f"# kernel compile report: Triton {triton.__version__}, targets "
          f"{', '.join(ARCH_NAMES.get(a, str(a)) for a in archs)}; {time.perf_counter() - start:.0f} s")
    print(f"# shapes: {SHAPES}; prefill chunk {CHUNK} queries over {KEYS} keys")
    print(format_table(rows))
    print("# shared: per program (limit 227 KB); regs: per thread; spill st/ld: bytes of local-memory stores/loads"
          " (ptxas -v's spills); in loop: such instructions inside a loop (what tests/test_kernel_compile.py fails"
          " on); mma: the instruction the tl.dot products compile to")
    bad = [(r, msg) for r in rows for msg in problems(r)]
    for r, msg in bad:
        print(f"PROBLEM {r.case} / {r.kernel} / sm_{r.arch}: {msg}")
    if uncovered:
        print(f"PROBLEM kernels no case launches: {', '.join(uncovered)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in rows], "uncovered": uncovered}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
