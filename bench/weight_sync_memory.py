"""Weight-sync time and peak memory of the driver and of the trainer ranks, per preset and ZeRO stage.

Real trainer ranks (trainer.worker.TrainerWorker: DeepSpeed on CPU, gloo, fp32) in spawned processes; every
rank calls `publish_weights` as TrainerGroup does (under ZeRO-3 all of them: the gathers, bucket by bucket,
are collectives), rank 0 writes the safetensors file the engines load and returns the handle. Measured per
rank: the wall time of the call and how far its peak resident memory (VmHWM, reset just before through
/proc/self/clear_refs) rose above its resident memory at the start of the call. The driver (this process)
only receives the handle; its own peak is reported the same way around the whole publish.
Run: `python bench/weight_sync_memory.py [--presets tiny,small] [--stages 1,3] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _rank_main(rank: int, world: int, port: int, checkpoint: str, stage: int, go, out: str) -> None:
    import torch

    from rl.algo.config import GRPOConfig
    from trainer.config import TrainerConfig
    from trainer.worker import TrainerWorker

    torch.set_num_threads(1)
    w = TrainerWorker(rank, world, "127.0.0.1", port, checkpoint, None, GRPOConfig(mini_batch_size=world),
                      TrainerConfig(num_ranks=world, zero_stage=stage), lr=1e-4, seed=0)
    go.wait()
    rss = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    handle = w.publish_weights(1) if rank == 0 or stage == 3 else None
    seconds = time.perf_counter() - t0
    result = {"rank": rank, "seconds": seconds, "peak_rise_mib": (_status_kb("VmHWM") - rss) / 1024,
              "rss_mib": rss / 1024, "file_mib": Path(handle.path).stat().st_size / MIB if handle else 0.0}
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    w.shutdown()


def measure(checkpoint: str, stage: int, world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp()
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(world + 1)
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, checkpoint, stage, go, out)) for r in range(world)]
    for p in procs:
        p.start()
    go.wait()  # every rank is built: from here on only the publish runs
    rss = _status_kb("VmRSS")
    _reset_peak()
    for p in procs:
        p.join(timeout=1800)
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"ZeRO-{stage} x {world}: a rank failed ({[p.exitcode for p in procs]})")
    driver = {"rank": "driver", "peak_rise_mib": (_status_kb("VmHWM") - rss) / 1024, "rss_mib": rss / 1024}
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)] + [driver]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--stages", default="1,3")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from transformers import DeepseekV32Config

    from rl.model.checkpoint import build_model, save_checkpoint
    from rl.model.presets import preset

    rows = []
    for name in args.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model = build_model(DeepseekV32Config(**preset(name)), seed=0)
            size = sum(p.numel() for p in model.parameters()) * 4 / MIB
            save_checkpoint(model, tmp)
            del model
            for stage in map(int, args.stages.split(",")):
                for r in measure(tmp, stage, args.ranks):
                    rows.append({"preset": name, "model_fp32_mib": size, "stage": stage, **r})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.ranks} ranks; peak rise = peak resident memory during the publish minus resident at its start")
    print("| preset | model fp32 MiB | ZeRO | process | publish s | peak rise MiB | resident MiB |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        secs = f"{r['seconds']:.2f}" if "seconds" in r else ""
        print(f"| {r['preset']} | {r['model_fp32_mib']:.0f} | {r['stage']} | {r['rank']} | {secs} | "
              f"{r['peak_rise_mib']:.0f} | {r['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
