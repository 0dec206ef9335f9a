"""Benchmark: keel's DSA prefill (Triton indexer + top-k + sparse MLA) against dense causal SDPA.

One layer at DeepSeek-V3.2 shapes, batch 1: 128 query heads; MLA in its shared-latent form (576-wide
entries = 512 latent + 64 RoPE, 512-wide values); indexer 64 heads x 128 dims, index_topk 2048;
dense SDPA with the unabsorbed MLA head dims (qk 192, v 128) as the baseline. For each length it
prints the forward and forward+backward times side by side, their ratio, each kernel's achieved
TFLOP/s (top-k: GB/s, it does no matmul), the bf16 matmul rate of this run, and the FP8 indexer's
speed-up over bf16. Prints figures only; nothing here asserts a time.

    python bench/dsa_kernels.py                      # CUDA: 8K, 16K, 32K, 64K, 128K
    python bench/dsa_kernels.py --lengths 8192,16384
    python bench/dsa_kernels.py --cpu-smoke          # no GPU: tiny shapes in the Triton interpreter
    python bench/dsa_kernels.py --model              # no GPU: FLOPs, bytes and the time they imply at peak
    python bench/dsa_kernels.py --json out.json      # also write the figures (and the model) to a file

The indexer scores and the top-k run in query chunks (--chunk) so the fp32 [chunk, L] score block
stays a few GiB at 128K; the forward+backward of the DSA path is: per chunk, scores (with grad) ->
top-k -> sparse indexer KL loss -> backward into the indexer; then the sparse MLA forward+backward
over all queries.

The model (--model, any machine) counts each kernel's useful FLOPs and the bytes it must move (inputs read
once, outputs written once; the top-k's five passes over the scores; every gathered kv row once per
query) and prints the time they imply at H100/H200 peak: max(FLOPs / peak rate, bytes / bandwidth).
Measured times can be held against it; a kernel at its model time is at the roofline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Shapes:
    heads: int = 128
    dk: int = 576
    dv: int = 512
    index_heads: int = 64
    index_dim: int = 128
    topk: int = 2048
    sdpa_qk: int = 192
    sdpa_v: int = 128


SMOKE = Shapes(heads=4, dk=48, dv=32, index_heads=2, index_dim=16, topk=16, sdpa_qk=48, sdpa_v=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072", help="comma-separated token counts")
    p.add_argument("--chunk", type=int, default=4096, help="query chunk of the indexer and top-k")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-backward", action="store_true", help="forward figures only")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    p.add_argument("--model", action="store_true", help="print the roofline model only (no GPU needed)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Roofline model
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """A GPU's datasheet peaks (dense, no sparsity): what no kernel beats."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    tbytes_per_s: float


PEAKS = (Peak("H100", 989.0, 1979.0, 3.35), Peak("H200", 989.0, 1979.0, 4.8))

#: Speed targets of the sparse MLA kernels on an H200 (issue 23), in useful TFLOP/s.
TARGET_TFLOPS = {"sparse MLA fwd": 500.0, "sparse MLA bwd": 400.0}


@dataclass(frozen=True)
class Work:
    """One kernel's useful FLOPs and bytes at one length.

    `bytes` is compulsory DRAM traffic: every tensor read or written once. `gathered` is what the sparse
    kernels' row gathers read (every selected kv row, once per query): L2 traffic while the kv entries fit
    in L2 (50 MB on an H100: 43K tokens of 1,152 B), DRAM traffic at worst beyond that.
    """

    kernel: str
    flops: float
    bytes: float
    gathered: float = 0.0
    fp8: bool = False

    def seconds(self, peak: Peak, rate_tflops: float | None = None) -> float:
        rate = rate_tflops or (peak.fp8_tflops if self.fp8 else peak.bf16_tflops)
        return max(self.flops / (rate * 1e12), self.bytes / (peak.tbytes_per_s * 1e12))

    def bound(self, peak: Peak) -> str:
        rate = (peak.fp8_tflops if self.fp8 else peak.bf16_tflops) * 1e12
        return "compute" if self.flops / rate >= self.bytes / (peak.tbytes_per_s * 1e12) else "memory"


def attended_entries(length: int, topk: int) -> int:
    """Selected (query, key) entries over all queries: query t attends min(topk, t + 1) keys."""
    k = min(topk, length)
    return k * (k + 1) // 2 + (length - k) * topk


def model(length: int, sh: Shapes, chunk: int) -> dict[str, list[Work]]:
    """The DSA path's kernels (forward, and the backward of training) and dense SDPA's, at one length.

    Sizes in bytes: bf16 activations (2), fp32 scores and gradients (4), int64 indices (8).
    """
    pairs = length * (length + 1) / 2  # causal (query, key) pairs
    att = attended_entries(length, sh.topk)
    # The indexer scores and the top-k run on [chunk, keys so far] blocks; the kernel writes each whole.
    score_elems = sum((min(length, c0 + chunk) - c0) * min(length, c0 + chunk) for c0 in range(0, length, chunk))
    hi, di = sh.index_heads, sh.index_dim
    idx_in = length * (hi * di + di) * 2 + length * hi * 4  # q, k (bf16), w (fp32)
    kv_bytes = length * sh.dk * 2
    gather = att * sh.dk * 2  # every selected kv row, once per query
    q_bytes, out_bytes = length * sh.heads * sh.dk * 2, length * sh.heads * sh.dv * 2
    indices = length * sh.topk * 8
    fwd = [
        Work("indexer fwd (bf16)", 2 * hi * di * pairs, idx_in + 4 * score_elems),
        Work("top-k", 0.0, 5 * 4 * score_elems + indices),
        Work("sparse MLA fwd", 2 * sh.heads * (sh.dk + sh.dv) * att, q_bytes + kv_bytes + indices + out_bytes,
             gather),
    ]
    bwd = [
        # The loss's target: the attention lse over S_t (recomputed: the model passes no lse), then p per entry.
        Work("indexer KL fwd", 2 * 2 * sh.heads * sh.dk * att, 2 * (q_bytes + kv_bytes + indices) + 4 * att,
             2 * gather),
        Work("indexer KL bwd", 0.0, 4 * score_elems + 3 * 4 * att),  # zero dI, read p and I, scatter dI
        # dq/dw walk the keys, dk the queries: each recomputes the logits (2 of its 4 GEMM-sized products).
        Work("indexer bwd", 4 * 2 * hi * di * pairs, 2 * (idx_in + 4 * score_elems) + length * (hi * di + di) * 4),
        # Recompute q.kv (dk), dP = dO v (dv), dq = dS kv (dk), dkv = dS^T q (dk) + P^T dO (dv). dq and dkv
        # are fp32; dkv is accumulated with atomics, whose traffic (4 B a column, per head block of 32 heads:
        # 4 per query) counts with the gathers.
        Work("sparse MLA bwd", 2 * sh.heads * (3 * sh.dk + 2 * sh.dv) * att,
             2 * q_bytes + 2 * out_bytes + 3 * kv_bytes + indices + length * sh.heads * sh.dk * 4,
             gather + 4 * att * sh.dk * 4),
    ]
    qk, v = sh.sdpa_qk, sh.sdpa_v
    sdpa_io = length * sh.heads * (2 * qk + 2 * v) * 2
    return dict(
        dsa_fwd=fwd,
        dsa_bwd=bwd,
        sdpa_fwd=[Work("dense SDPA fwd", 2 * sh.heads * (qk + v) * pairs, sdpa_io)],
        sdpa_bwd=[Work("dense SDPA bwd", 2 * sh.heads * (3 * qk + 2 * v) * pairs, 2 * sdpa_io)],
    )


def model_rows(lengths: list[int], sh: Shapes, chunk: int) -> list[dict]:
    """One row per (length, kernel), the totals, and the sparse MLA targets, with each peak's milliseconds."""

    def row(length: int, kernel: str, works: list[Work], kind: str, rate: float | None = None) -> dict:
        return dict(length=length, kernel=kernel, gflop=sum(w.flops for w in works) / 1e9,
                    gbytes=sum(w.bytes for w in works) / 1e9, gathered_gb=sum(w.gathered for w in works) / 1e9,
                    **{f"{pk.name}_ms": sum(w.seconds(pk, rate) for w in works) * 1e3 for pk in PEAKS},
                    bound=kind or "/".join(w.bound(pk) for w in works for pk in PEAKS))

    rows = []
    for length in lengths:
        parts = model(length, sh, chunk)
        rows += [row(length, w.kernel, [w], "") for w in parts["dsa_fwd"] + parts["dsa_bwd"] + parts["sdpa_bwd"]]
        rows += [
            row(length, "DSA fwd (indexer + top-k + MLA)", parts["dsa_fwd"], "total"),
            row(length, "DSA fwd+bwd", parts["dsa_fwd"] + parts["dsa_bwd"], "total"),
            row(length, "dense SDPA fwd", parts["sdpa_fwd"], "total"),
            row(length, "dense SDPA fwd+bwd", parts["sdpa_fwd"] + parts["sdpa_bwd"], "total"),
        ]
        for kernel, tflops in TARGET_TFLOPS.items():
            work = next(w for w in parts["dsa_fwd"] + parts["dsa_bwd"] if w.kernel == kernel)
            rows.append(row(length, f"{kernel} at {tflops:.0f} TFLOP/s (target)", [work], "target", tflops))
    return rows


def print_model(lengths: list[int], sh: Shapes, chunk: int) -> list[dict]:
    rows = model_rows(lengths, sh, chunk)
    print("# DSA kernels, roofline model: one layer at DeepSeek-V3.2 shapes, batch 1 (no GPU needed)")
    print(f"# shapes: {sh}, chunk {chunk}")
    print("# " + "; ".join(f"{pk.name}: {pk.bf16_tflops:.0f} TFLOP/s bf16, {pk.fp8_tflops:.0f} fp8, "
                           f"{pk.tbytes_per_s} TB/s" for pk in PEAKS))
    print("# time = max(FLOPs / peak, GB / bandwidth). FLOPs: useful work (causal pairs, selected entries).")
    print("# GB: compulsory DRAM traffic; gather GB: the sparse kernels' row gathers and dkv atomics (L2 traffic")
    print("# while kv fits in L2; at worst DRAM traffic beyond). bound: H100/H200.")
    header = (f"{'L':>7} | {'kernel':<42} | {'GFLOP':>10} | {'GB':>7} | {'gather GB':>9} | {'H100 ms':>9} | "
              f"{'H200 ms':>9} | bound")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        length = f"{r['length']:>7}" if r["length"] != last else " " * 7
        last = r["length"]
        print(f"{length} | {r['kernel']:<42} | {r['gflop']:>10.1f} | {r['gbytes']:>7.2f} | {r['gathered_gb']:>9.1f} | "
              f"{r['H100_ms']:>9.3f} | {r['H200_ms']:>9.3f} | {r['bound']}")
    print("# 'DSA fwd' is what the bench times as 'DSA fwd'; 'DSA fwd+bwd' adds the indexer KL loss, the indexer")
    print("# backward and the sparse MLA backward (the bench's 'DSA f+b'). The 'fwd x' the peaks allow:")
    for length in lengths:
        by = {r["kernel"]: r for r in rows if r["length"] == length}
        fwd, sdpa = by["DSA fwd (indexer + top-k + MLA)"], by["dense SDPA fwd"]
        fb, sdpa_fb = by["DSA fwd+bwd"], by["dense SDPA fwd+bwd"]
        print(f"#   L={length}: DSA fwd / SDPA fwd = {fwd['H200_ms'] / sdpa['H200_ms']:.3f}, "
              f"f+b / f+b = {fb['H200_ms'] / sdpa_fb['H200_ms']:.3f} (H200 peaks)")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.model:
        rows = print_model(lengths, Shapes(), args.chunk)
        if args.json:
            Path(args.json).write_text(json.dumps({"model": rows}, indent=1))
        return 0
    # Run from a checkout without installing keel: make `kernels` importable from the repo root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.cpu_smoke:
        # Must precede the first Triton import: the interpreter is chosen when kernels are decorated.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/dsa_kernels.py: no CUDA device; the figures need a GPU. "
              "Run with --cpu-smoke to exercise the code path on CPU (tiny shapes, no meaningful times), "
              "or --model for the roofline model.")
        return 0
    bench = Bench(args, torch)
    model = [] if args.cpu_smoke else model_rows(bench.lengths, Shapes(), args.chunk)

    def save(measured: list[dict]) -> None:
        # After every length: a run stopped at its time limit keeps the lengths it finished.
        if args.json:
            Path(args.json).write_text(json.dumps({"measured": measured, "model": model}, indent=1))

    bench.run(save)
    return 0


class Bench:
    def __init__(self, args: argparse.Namespace, torch_module) -> None:
        import torch

        self.torch = torch_module
        self.args = args
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.shapes = SMOKE if self.smoke else Shapes()
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.lengths = [64, 96] if self.smoke else [int(x) for x in args.lengths.split(",")]
        self.chunk = 32 if self.smoke else args.chunk
        self.iters = 1 if self.smoke else args.iters
        self.warmup = 0 if self.smoke else args.warmup

    # -- timing ------------------------------------------------------------------------------------------

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median wall time of fn in ms (CUDA events on GPU). Returns nan when it runs out of memory."""
        torch = self.torch
        try:
            for _ in range(self.warmup):
                fn()
            times = []
            for _ in range(self.iters):
                if self.device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[len(times) // 2]
        except torch.OutOfMemoryError:
            return float("nan")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- workloads ---------------------------------------------------------------------------------------

    def matmul_tflops(self) -> float:
        n = 256 if self.smoke else 8192
        a = self.torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = self.torch.randn(n, n, device=self.device, dtype=self.dtype)
        ms = self.time_ms(lambda: a @ b)
        return 2 * n**3 / ms / 1e9

    def dense_sdpa(self, length: int) -> tuple[float, float]:
        torch, sh = self.torch, self.shapes
        import torch.nn.functional as F

        def make(d: int) -> torch.Tensor:
            return torch.randn(1, sh.heads, length, d, device=self.device, dtype=self.dtype)

        q, k, v = make(sh.sdpa_qk), make(sh.sdpa_qk), make(sh.sdpa_v)
        fwd = self.time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        if self.args.no_backward:
            return fwd, float("nan")
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        grad = torch.randn_like(v)

        def step() -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        return fwd, self.time_ms(step)

    def dsa_inputs(self, length: int) -> dict:
        torch, sh = self.torch, self.shapes
        gen = dict(device=self.device, dtype=self.dtype)
        return dict(
            iq=torch.randn(1, length, sh.index_heads, sh.index_dim, **gen),
            ik=torch.randn(1, length, sh.index_dim, **gen),
            iw=torch.rand(1, length, sh.index_heads, device=self.device) * sh.index_heads**-0.5,
            q=torch.randn(1, length, sh.heads, sh.dk, **gen),
            kv=torch.randn(1, length, sh.dk, **gen),
        )

    def chunks(self, length: int):
        for c0 in range(0, length, self.chunk):
            yield c0, min(length, c0 + self.chunk)

    def select(self, x: dict, length: int, scores_fn, timings: dict | None = None):
        """Chunked indexer + top-k; returns indices [1, L, topk] (-1 padded)."""
        from kernels.topk_triton import topk_indices_triton

        torch, k = self.torch, self.shapes.topk
        indices = torch.full((1, length, min(k, length)), -1, dtype=torch.int64, device=self.device)
        for c0, c1 in self.chunks(length):
            scores = scores_fn(x, c0, c1)
            sel = topk_indices_triton(scores, k)
            indices[:, c0:c1, : sel.shape[-1]] = sel
        return indices

    def run(self, save: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
        """Print the table; return its rows (one dict per length, with the matmul rate and the device),
        handing them to `save` after each length."""
        torch, sh = self.torch, self.shapes
        device_name = "CPU (Triton interpreter smoke run)" if self.smoke else torch.cuda.get_device_name()
        print(f"# keel DSA kernels vs dense SDPA - {device_name}, torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()}")
        print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
        print(f"# shapes: {sh}, chunk {self.chunk}, dtype {self.dtype}")
        mm = self.matmul_tflops()
        print(f"# {self.dtype} matmul rate ({256 if self.smoke else 8192}^3): {mm:.3f} TFLOP/s")
        header = (
            f"{'L':>7} | {'SDPA fwd':>9} {'SDPA f+b':>9} | {'DSA fwd':>9} {'DSA f+b':>9}"
            f" | {'fwd x':>6} {'f+b x':>6} | {'idx bf16':>9} {'idx fp8':>9} {'fp8 x':>5} | {'topk':>8}"
            f" | {'attn fwd':>9} {'attn bwd':>9}"
        )
        print(header)
        print("-" * len(header))
        rows = []
        for length in self.lengths:
            try:
                r = self.measure(length)
            except Exception as exc:  # one length failing (a kernel error) must not lose the others' figures
                print(f"{length:>7} | FAILED: {type(exc).__name__}: {exc}", flush=True)
                rows.append(dict(length=length, device=device_name, matmul_tflops=mm, error=repr(exc)))
                save(rows)
                continue
            rows.append(dict(length=length, device=device_name, matmul_tflops=mm, **r))
            save(rows)
            print(
                f"{length:>7} | {r['sdpa_fwd']:>7.1f}ms {r['sdpa_fb']:>7.1f}ms"
                f" | {r['dsa_fwd']:>7.1f}ms {r['dsa_fb']:>7.1f}ms"
                f" | {r['dsa_fwd'] / r['sdpa_fwd']:>6.3f} {r['dsa_fb'] / r['sdpa_fb']:>6.3f}"
                f" | {r['idx_tf']:>5.1f}TF/s {r['idx8_tf']:>5.1f}TF/s {r['idx_ms'] / r['idx8_ms']:>5.2f}"
                f" | {r['topk_gbs']:>4.0f}GB/s | {r['attn_tf']:>5.1f}TF/s {r['attn_bwd_tf']:>5.1f}TF/s",
                flush=True,
            )
        print("# times are medians; 'fwd x' = DSA fwd / SDPA fwd (goal <= 0.333 at 64K, <= 0.2 at 128K)")
        print(f"# goals: attention fwd >= 50% of the matmul rate ({0.5 * mm:.3f} TFLOP/s); "
              "FP8 indexer >= 1.6x bf16")
        print("# targets on an H200: " + ", ".join(f"{k} >= {v:.0f} TFLOP/s" for k, v in TARGET_TFLOPS.items())
              + " ('attn fwd', 'attn bwd'); `--model` prints the times the datasheet peaks allow")
        print("# TFLOP/s count useful work: causal pairs (indexer), selected entries (attention)")
        return rows

    def measure(self, length: int) -> dict[str, float]:
        """All figures of one sequence length (nan where a step ran out of memory)."""
        from kernels.indexer_loss_triton import indexer_kl_loss_triton
        from kernels.indexer_triton import (
            indexer_scores_fp8_triton,
            indexer_scores_triton,
            quantize_indexer_fp8,
        )
        from kernels.sparse_mla_triton import sparse_mla_attention_triton
        from kernels.topk_triton import topk_indices_triton

        torch, sh = self.torch, self.shapes
        scale = sh.dk**-0.5
        x = self.dsa_inputs(length)
        pairs = length * (length + 1) / 2  # causal (t, s) pairs: the indexer's useful work
        attended = sum(min(sh.topk, t + 1) for t in range(length))  # selected entries over all queries

        def bf16_scores(x: dict, c0: int, c1: int):
            return indexer_scores_triton(x["iq"][:, c0:c1], x["ik"][:, :c1], x["iw"][:, c0:c1])

        q8, k8, w8, ks = quantize_indexer_fp8(x["iq"], x["ik"], x["iw"])

        def fp8_scores(x: dict, c0: int, c1: int):
            return indexer_scores_fp8_triton(q8[:, c0:c1], k8[:, :c1], w8[:, c0:c1], ks[:, :c1])

        def all_scores(fn) -> None:
            for c0, c1 in self.chunks(length):
                fn(x, c0, c1)

        t_idx = self.time_ms(lambda: all_scores(bf16_scores))
        t_idx8 = self.time_ms(lambda: all_scores(fp8_scores))
        # Top-k alone: (indexer + top-k) minus the indexer, so no more than one score chunk is alive.
        t_select = self.time_ms(lambda: self.select(x, length, bf16_scores))
        t_topk = t_select - t_idx
        # Bytes the radix select reads: 4 histogram passes + 1 compaction pass over each fp32 row.
        topk_bytes = 5 * 4 * sum((c1 - c0) * c1 for c0, c1 in self.chunks(length))
        indices = self.select(x, length, bf16_scores)
        t_attn = self.time_ms(lambda: sparse_mla_attention_triton(x["q"], x["kv"], indices, scale, sh.dv))
        t_fwd = t_select + t_attn  # indexer + top-k + sparse attention, run back to back
        t_attn_bwd = t_fb = float("nan")
        if not self.args.no_backward:
            q = x["q"].clone().requires_grad_()
            kv = x["kv"].clone().requires_grad_()
            dout = torch.randn(1, length, sh.heads, sh.dv, device=self.device, dtype=self.dtype)
            t_attn_fb = self.time_ms(
                lambda: sparse_mla_attention_triton(q, kv, indices, scale, sh.dv)[0].backward(dout)
            )
            t_attn_bwd = t_attn_fb - t_attn
            iq, ik, iw = (x[name].clone().requires_grad_() for name in ("iq", "ik", "iw"))

            def forward_backward() -> None:
                for c0, c1 in self.chunks(length):
                    scores = indexer_scores_triton(iq[:, c0:c1], ik[:, :c1], iw[:, c0:c1])
                    sel = topk_indices_triton(scores.detach(), sh.topk)
                    indexer_kl_loss_triton(x["q"][:, c0:c1], x["kv"][:, :c1], scale, scores, sel).backward()
                sparse_mla_attention_triton(q, kv, indices, scale, sh.dv)[0].backward(dout)

            t_fb = self.time_ms(forward_backward)
        sdpa_fwd, sdpa_fb = self.dense_sdpa(length)

        def tflops(flops: float, ms: float) -> float:
            return flops / ms / 1e9

        return dict(
            sdpa_fwd=sdpa_fwd, sdpa_fb=sdpa_fb, dsa_fwd=t_fwd, dsa_fb=t_fb, idx_ms=t_idx, idx8_ms=t_idx8,
            idx_tf=tflops(2 * sh.index_heads * sh.index_dim * pairs, t_idx),
            idx8_tf=tflops(2 * sh.index_heads * sh.index_dim * pairs, t_idx8),
            topk_gbs=topk_bytes / t_topk / 1e6,
            attn_tf=tflops(2 * sh.heads * (sh.dk + sh.dv) * attended, t_attn),
            # backward: recompute q.kv (dk), dP = dO v^T (dv), dq (dk), dkv from dS (dk) and from P (dv)
            attn_bwd_tf=tflops(2 * sh.heads * (3 * sh.dk + 2 * sh.dv) * attended, t_attn_bwd),
        )

if __name__ == "__main__":
    sys.exit(main())
