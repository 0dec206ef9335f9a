"""Per-rank bytes of parameters, gradients and optimiser states for ZeRO-1/2/3 at one and two ranks.

Each configuration starts real trainer ranks (trainer.worker.TrainerWorker: DeepSpeed on CPU, gloo, fp32) in
spawned processes on a keel checkpoint of a preset, takes one LM step, and rank 0 reports what it holds:
  parameters  the local storage of every model parameter (a ZeRO-3 shard, or the whole tensor)
  gradients   gradient storage held when the step starts: p.grad of every parameter plus the engine's own
              reduced-gradient partitions (ZeRO-2/3)
  optimiser   AdamW's moments and the fp32 master copies DeepSpeed keeps apart from the parameters, plus
              the lightning indexer's own optimiser (trainer.indexer_optim)
Goal: ZeRO-3's per-rank parameter bytes about 1/N of the model's.
Run: `python bench/trainer_memory.py [--preset tiny] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import tempfile
from pathlib import Path

import torch


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for x in obj for t in _tensors(x)]
    return []


def _grad_bytes(engine, model) -> int:
    held = sum(_nbytes(p.grad) for p in model.parameters())
    opt = engine.optimizer
    flat = getattr(opt, "grad_partitions_flat_buffer", None)  # ZeRO-3: every reduced partition in one buffer
    if torch.is_tensor(flat):
        return held + _nbytes(flat)
    return held + sum(_nbytes(t) for t in _tensors(getattr(opt, "averaged_gradients", None)))


def _optimiser_bytes(worker) -> int:
    own = {id(p) for p in worker.model.parameters()}
    opt = worker.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    total = sum(_nbytes(t) for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    # DeepSpeed's fp32 master partitions (ZeRO-3 puts them in the torch optimiser's groups only during a step).
    masters = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups",
                                                                            None)
    if masters is not None:
        total += sum(_nbytes(t) for t in _tensors(masters))
    else:
        total += sum(_nbytes(p) for g in inner.param_groups for p in g["params"] if id(p) not in own)
    if worker.indexer_optim is not None:
        io = worker.indexer_optim
        total += sum(_nbytes(t) for s in io.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
                     and t.dim())
        total += sum(_nbytes(m) for m, p in zip(io.masters, io.params, strict=True) if m is not p)
    return total


def _rank_main(rank: int, world: int, port: int, checkpoint: str, stage: int, out: str) -> None:
    from rl.algo.config import GRPOConfig
    from trainer.config import TrainerConfig
    from trainer.worker import TrainerWorker

    torch.set_num_threads(1)
    trainer = TrainerConfig(num_ranks=world, zero_stage=stage)
    w = TrainerWorker(rank, world, "127.0.0.1", port, checkpoint, None, GRPOConfig(mini_batch_size=2 * world),
                      trainer, lr=1e-4, seed=0)
    seen = {}
    real_step = w.engine.step

    def step(*args, **kwargs):
        seen["gradients"] = _grad_bytes(w.engine, w.model)
        return real_step(*args, **kwargs)

    w.engine.step = step
    ids = torch.randint(3, 50, (2, 17), generator=torch.Generator().manual_seed(rank))
    w.train_step(ids[:, :-1], ids[:, 1:], torch.ones(2, 16))
    local = sum(_nbytes(p.ds_tensor if hasattr(p, "ds_id") else p) for p in w.model.parameters())
    full = sum(4 * (p.ds_numel if hasattr(p, "ds_id") else p.numel()) for p in w.model.parameters())
    result = {"parameters": local, "gradients": seen["gradients"], "optimiser": _optimiser_bytes(w),
              "model_fp32": full}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    w.shutdown()


def measure(checkpoint: str, stage: int, world: int) -> dict:
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, checkpoint, stage, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"ZeRO-{stage} x {world}: a rank failed ({[p.exitcode for p in procs]})")
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from transformers import DeepseekV32Config

    from rl.model.checkpoint import build_model, save_checkpoint
    from rl.model.presets import preset

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(build_model(DeepseekV32Config(**preset(args.preset)), seed=0), tmp)
        stages = [int(s) for s in args.stages.split(",")]
        rows = [{"stage": s, "ranks": n, **measure(tmp, s, n)} for s in stages for n in (1, 2)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    mb = 1 << 20
    print(f"preset {args.preset}: model {rows[0]['model_fp32'] / mb:.2f} MiB in fp32; bytes held by rank 0 (MiB)")
    print("| ZeRO | ranks | parameters | gradients | optimiser | parameters / model |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['stage']} | {r['ranks']} | {r['parameters'] / mb:.2f} | {r['gradients'] / mb:.2f} | "
              f"{r['optimiser'] / mb:.2f} | {r['parameters'] / r['model_fp32']:.2f} |")


if __name__ == "__main__":
    main()
