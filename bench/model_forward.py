"""Forward+backward throughput and peak memory of keel's model.

    python bench/model_forward.py                       # tiny preset on CPU
    python bench/model_forward.py --preset small --device cuda --dtype bfloat16 --seqlen 4096
    python bench/model_forward.py --json out.json

Prints tokens/s for forward+backward of the LM loss (Keep Routing off) and the peak memory
(CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set size).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import DeepseekV32Config

from rl.model.presets import preset
from rl.model.transformer import Transformer, init_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sparse", action="store_true", help="DSA top-k attention (matters when seqlen > index_topk)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    model = Transformer(DeepseekV32Config(**preset(args.preset)))
    init_weights(model, seed=0)
    model = model.to(args.device, dtype)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seqlen), device=args.device)

    def step() -> None:
        out = model(ids, sparse=args.sparse)
        loss = model.logits(out.hidden).float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernel selection)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    elapsed = time.perf_counter() - start
    figures = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "fwd_bwd_tokens_per_s": args.batch * args.seqlen * args.iters / elapsed,
        "ms_per_step": 1000 * elapsed / args.iters,
        "peak_memory_mb": peak_mb,
    }
    for k, v in figures.items():
        print(f"{k:>22}: {v:.2f}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
