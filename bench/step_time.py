"""Time per phase of one RL step (rollout, reward, reference, update, weight sync) for a recipe.

    python bench/step_time.py                                  # the quickstart setting, 10 steps
    python bench/step_time.py configs/quickstart.yaml --steps 20 --json step_time.json
    python bench/step_time.py configs/quickstart.yaml rollout.prompts_per_step=64
    python bench/step_time.py --baseline                       # as before 2026-11-30 (see below)

Runs a real `keel train` (SFT skipped: the timings do not depend on what the model knows; rollouts are dumped
as the config says, the quickstart does), then prints the mean seconds of each phase over the steps after the
first (which pays for warm-up), so the slowest phase is visible. Phases: rollout (the engines' generate and the
batch), reward (scoring), ref and update (inside the trainer ranks: reference/first-look forwards, then the
optimiser steps), train call (the rest of the trainer call: moving the batch to the ranks and back), sync (publish
and load the new weights), dump (the step's rollouts to parquet), other (the driver's own work between phases);
step is the wall time of the whole step.

--baseline measures the step as it was before 2026-11-30: every reward scored in Ray tasks (one per sample, as
if none were marked pure) and vLLM's engine core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rl.loop.config import load_config
from rl.loop.driver import train
from rl.loop.metrics import read_metrics

PHASES = ("time/rollout", "time/reward", "time/ref", "time/update", "time/train_call", "time/sync", "time/dump",
          "time/other", "time/step")


def phases(m: dict) -> dict[str, float]:
    """One step's phase times, with the two derived ones (train call, other) worked out."""
    out = {p: float(m.get(p) or 0.0) for p in PHASES}
    out["time/train_call"] = max(float(m.get("time/train") or 0.0) - out["time/ref"] - out["time/update"], 0.0)
    measured = ("time/rollout", "time/reward", "time/train", "time/sync", "time/dump")
    out["time/other"] = max(out["time/step"] - sum(float(m.get(p) or 0.0) for p in measured), 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(Path(__file__).parent.parent / "configs" / "quickstart.yaml"))
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--baseline", action="store_true",
                    help="rewards in Ray tasks and the engine core in its own process, as before 2026-11-30")
    args = ap.parse_args()
    if args.baseline:
        import os

        import rewards.scoring

        rewards.scoring.is_pure_reward = lambda fn: False
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # inherited by the rollout worker (Ray starts it here)

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"run.steps={args.steps}", f"run.checkpoint_every={args.steps}", f"run.output_dir={out}",
            "run.wandb_mode=disabled", "sft.steps=0", "data.eval_size=16",
            *args.overrides,
        ]
        run_dir = train(load_config(args.config, overrides))
        steps = [phases(m) | {"tokens_per_s": m["tokens_per_s"]} for m in read_metrics(run_dir)
                 if "time/step" in m][1:]
    figures = {p: sum(m[p] for m in steps) / len(steps) for p in PHASES}
    figures["tokens_per_s_rollout"] = sum(m["tokens_per_s"] for m in steps) / len(steps)
    figures["time/step_median"] = sorted(m["time/step"] for m in steps)[len(steps) // 2]
    slowest = max(PHASES[:-1], key=figures.get)
    print(f"mean over {len(steps)} steps ({args.config} {' '.join(args.overrides)}"
          f"{', baseline' if args.baseline else ''})")
    for p in PHASES:
        share = 100 * figures[p] / figures["time/step"]
        print(f"  {p:<14} {figures[p]:8.3f} s  {share:5.1f}%{'   <- slowest' if p == slowest else ''}")
    print(f"  median step    {figures['time/step_median']:8.3f} s")
    print(f"  rollout tokens/s {figures['tokens_per_s_rollout']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
