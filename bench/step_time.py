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

--staleness 0 1 2 runs the setting once per rollout.max_staleness (0 = synchronous; N > 0 samples step t with the
weights of step t - N while the trainer updates, rl/loop/pipeline.py) and prints samples/s for each, the time
the trainer waited for rollouts, and the gain a synchronous step's own phase times predict when rollout and update
run on separate devices: (rollout + reward + train + sync) / (max(rollout + reward, train) + sync).

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
    ap.add_argument("--staleness", type=int, nargs="+", metavar="N",
                    help="compare rollout.max_staleness values (samples/s, waits, predicted overlap gain)")
    args = ap.parse_args()
    if args.baseline:
        import os

        import rewards.scoring

        rewards.scoring.is_pure_reward = lambda fn: False
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # inherited by the rollout worker (Ray starts it here)

    if args.staleness:
        compare_staleness(args)
        return
    steps = measure(args.config, args.steps, args.overrides)
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


def measure(config: str, n_steps: int, overrides: list[str]) -> list[dict[str, float]]:
    """Phase times of each step of a fresh run, the first (warm-up) left out."""
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"run.steps={n_steps}", f"run.checkpoint_every={n_steps}", f"run.output_dir={out}",
            "run.wandb_mode=disabled", "sft.steps=0", "data.eval_size=16",
            *overrides,
        ]
        run_dir = train(load_config(config, overrides))
        return [phases(m) | {"tokens_per_s": m["tokens_per_s"], "wait": float(m.get("time/wait_rollout", 0.0))}
                for m in read_metrics(run_dir) if "time/step" in m][1:]


def overlap_gain(rollout: float, train: float, sync: float) -> float:
    """Step time synchronous / asynchronous when rollout (with reward) and train run on separate devices and fully
    overlap: (rollout + train + sync) / (max(rollout, train) + sync)."""
    return (rollout + train + sync) / (max(rollout, train) + sync)


def compare_staleness(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    samples = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    rows = {}
    for n in args.staleness:
        steps = measure(args.config, args.steps, [*args.overrides, f"rollout.max_staleness={n}"])
        mean = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
        rows[n] = {"step_s": mean["time/step"], "samples_per_s": samples / mean["time/step"],
                   "rollout_s": mean["time/rollout"] + mean["time/reward"], "wait_s": mean["wait"],
                   "train_s": mean["time/ref"] + mean["time/update"] + mean["time/train_call"],
                   "sync_s": mean["time/sync"]}
    print(f"mean over {args.steps - 1} steps per row ({args.config} {' '.join(args.overrides)}; {samples} samples "
          "a step)")
    print(f"  {'max_staleness':>13} {'step s':>8} {'samples/s':>10} {'rollout s':>10} {'waited s':>9} {'train s':>8}"
          f" {'sync s':>7}")
    for n, r in rows.items():
        print(f"  {n:>13} {r['step_s']:8.3f} {r['samples_per_s']:10.1f} {r['rollout_s']:10.3f} {r['wait_s']:9.3f}"
              f" {r['train_s']:8.3f} {r['sync_s']:7.3f}")
    if 0 in rows:
        r = rows[0]
        gain = overlap_gain(r["rollout_s"], r["train_s"], r["sync_s"])
        print(f"  predicted from the synchronous phases, rollout and update on separate devices: {gain:.2f}x")
        rows["predicted_gain_separate_devices"] = gain
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
