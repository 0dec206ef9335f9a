"""The quickstart over several seeds: one fresh `keel train` per seed, then a table of held-out greedy accuracy after
SFT and after GRPO, the gain, and the wall time.

    python bench/quickstart_seeds.py                                  # seeds 0-4, the full quickstart each
    python bench/quickstart_seeds.py --seeds 0 1 --json seeds.json    # also write the figures as JSON
    python bench/quickstart_seeds.py --seeds 0 -- run.steps=60        # overrides after -- go to every run

Seed S runs `keel train configs/quickstart.yaml run.seed=S model.seed=S data.seed=S` in its own process (the
model's initial weights, the training rows and the teacher's slips, the prompts of each step and the samples all
change with S; the held-out prompts stay the same, drawn with data.eval_seed). Runs go one after the other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def keel_command() -> list[str]:
    script = Path(sys.executable).parent / "keel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rl.cli"]


def run_seed(config: str, seed: int, output_dir: Path, overrides: list[str]) -> dict:
    """One fresh `keel train` for `seed`; its summary (accuracy before/after RL), wall time and run directory."""
    out = output_dir / f"seed{seed}"
    cmd = [*keel_command(), "train", config, f"run.seed={seed}", f"model.seed={seed}", f"data.seed={seed}",
           f"run.output_dir={out}", *overrides]
    print(f"seed {seed}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"seed {seed}: keel train failed with exit status {proc.returncode}")
    run_dir = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
    summary = json.loads((run_dir / "summary.json").read_text())
    sft, rl = summary["eval_before"], summary["eval_after"]
    return {"seed": seed, "sft_accuracy": sft, "rl_accuracy": rl, "gain": rl - sft, "wall_s": wall,
            "run_dir": str(run_dir)}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--output-dir", help="keep the runs here (default: a temporary directory, removed afterwards)")
    ap.add_argument("--json", help="also write the table and its summary to this file")
    ap.add_argument("overrides", nargs="*", help="omegaconf dot-list overrides for every run (after --)")
    args = ap.parse_args()

    keep = args.output_dir is not None
    output_dir = Path(args.output_dir) if keep else Path(tempfile.mkdtemp(prefix="keel-seeds-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run_seed(args.config, s, output_dir, args.overrides) for s in args.seeds]
    finally:
        if not keep:
            shutil.rmtree(output_dir, ignore_errors=True)
    print(f"\nheld-out greedy accuracy ({args.config} {' '.join(args.overrides)})")
    print(f"{'seed':>4}  {'after SFT':>9}  {'after GRPO':>10}  {'gain':>6}  {'wall':>7}")
    for r in rows:
        print(f"{r['seed']:>4}  {r['sft_accuracy']:>9.3f}  {r['rl_accuracy']:>10.3f}  {r['gain']:>+6.3f}  "
              f"{r['wall_s'] / 60:>5.1f} min")
    summary = {k: spread([r[k] for r in rows]) for k in ("sft_accuracy", "rl_accuracy", "gain", "wall_s")}
    for k, label in (("sft_accuracy", "after SFT"), ("rl_accuracy", "after GRPO"), ("gain", "gain")):
        s = summary[k]
        print(f"{label:>10}: mean {s['mean']:.3f}, range {s['min']:.3f} to {s['max']:.3f}")
    w = summary["wall_s"]
    print(f"      wall: mean {w['mean'] / 60:.1f} min, range {w['min'] / 60:.1f} to {w['max'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "config": args.config, "overrides": args.overrides, "runs": rows, "summary": summary,
        }, indent=1))


if __name__ == "__main__":
    main()
