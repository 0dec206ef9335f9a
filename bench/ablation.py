"""The stabiliser ablation: the same RL task under a train-inference mismatch (a bf16 engine, an fp32 trainer,
top-k sampling), run with all four DeepSeek-V3.2 stabilisers on, each off in turn, and all off, over seeds.

    python bench/ablation.py                                   # 3 seeds x 6 variants, configs/ablation.yaml
    python bench/ablation.py --seeds 0 1 --steps 60 --json ablation.json --plot docs/ablation.png
    python bench/ablation.py --variants all_on fp32_engine     # fp32_engine: all on, no mismatch (the control)
    python bench/ablation.py --variants all_on stale stale_all_off   # stale: the engine one update behind
    python bench/ablation.py --variants offpolicy offpolicy_all_off  # stale, and 8 optimiser steps per batch
    python bench/ablation.py --from-json a.json b.json --plot docs/ablation.png   # table and plot again, no runs

Per seed S: one supervised warm start (`keel train CONFIG run.steps=0`, seed S), then every variant as a fresh
`keel train` from that warm-started model (model.checkpoint, sft.steps=0, run.seed=S data.seed=S): the variants
of a seed share their initial model, training prompts and held-out prompts, and differ only in their switches.
Runs go one after the other, each in its own process (one engine at a time).

Per variant, over seeds: final and best held-out greedy accuracy; the train-inference mismatch the trainer saw
on each step's first forward (mean |log pi_samp - log pi_theta|, `logp_mismatch_first`) and its routing
agreement; the fraction of sequences the off-policy mask dropped; gradient-norm spikes
(`rl.loop.metrics.grad_norm_spikes`: steps above 3x the run's median) and the largest norm; and whether the run
collapsed (`rl.loop.metrics.collapsed`: its 10-step mean training reward ends below half its best). With --probe
(default on), a bf16 engine in this process samples held-out prompts from each run's final model and keel's fp32 model
scores them (`rl.loop.metrics.mismatch_probe`): routing agreement per MoE layer, kept-set disagreement, the
log-prob mismatch distribution and the train-inference KL, at the end of training. Then each variant against its
control (all_on; stale_all_off against stale, offpolicy_all_off against offpolicy), paired seed by seed
(`rl.loop.metrics.paired_difference`): the mean difference in final accuracy and in the last 20 steps' training
reward, with its standard error.
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
sys.path.insert(0, str(ROOT))

from rl.loop.metrics import collapsed, grad_norm_spikes, paired_difference, read_metrics  # noqa: E402

OFF = {
    "keep_routing": "grpo.keep_routing=false",
    "keep_sampling_mask": "grpo.keep_sampling_mask=false",
    "offpolicy_mask": "grpo.offpolicy_delta=null",
    "unbiased_kl": "grpo.kl_estimator=k3",  # off: the usual k3 estimator, which the unbiased one corrects
}
VARIANTS = {
    "all_on": [],
    **{f"no_{name}": [override] for name, override in OFF.items()},
    "all_off": list(OFF.values()),
    "fp32_engine": ["rollout.engine.dtype=float32"],  # all on, engine and trainer both fp32: no mismatch
    # Stale weights on top of the bf16 engine: step t is sampled by version t - 1 (asynchronous RL,
    # docs/ASYNC.md), so pi_old is one update behind pi_theta, the gap the off-policy mask and the unbiased KL are for.
    "stale": ["rollout.max_staleness=1"],
    "stale_all_off": ["rollout.max_staleness=1", *OFF.values()],
    # The far off-policy regime: stale weights and 8 optimiser steps per rollout batch (mini-batches of 32 of the
    # 256 samples instead of 128), so the last mini-batch is trained by a policy 8 updates past the one that sampled it.
    "offpolicy": ["rollout.max_staleness=1", "grpo.mini_batch_size=32"],
    "offpolicy_all_off": ["rollout.max_staleness=1", "grpo.mini_batch_size=32", *OFF.values()],
}
DEFAULT_VARIANTS = ["all_on", *(f"no_{name}" for name in OFF), "all_off"]
# What each variant is compared with, seed by seed: the run that differs from it only in the switches it names.
CONTROL = {"stale_all_off": "stale", "offpolicy_all_off": "offpolicy"}
LATE_STEPS = 20  # the training reward of the last LATE_STEPS steps: 32 prompts x 8 samples each, 5120 in all


def keel_command() -> list[str]:
    script = Path(sys.executable).parent / "keel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rl.cli"]


def keel_train(config: str, out: Path, overrides: list[str], log: Path, attempts: int = 2) -> Path:
    """One `keel train` in its own process; its run directory. A failed run is started afresh once: on a shared
    machine a start-up can lose a race for a port (DeepSpeed's rendezvous), which says nothing about the run."""
    cmd = [*keel_command(), "train", config, f"run.output_dir={out}", *overrides]
    for attempt in range(1, attempts + 1):
        shutil.rmtree(out, ignore_errors=True)
        with log.open("w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0:
            return max(out.iterdir(), key=lambda p: p.stat().st_mtime)
        print(log.read_text()[-3000:], file=sys.stderr)
        print(f"keel train failed (attempt {attempt} of {attempts}, exit status {proc.returncode}): {' '.join(cmd)}",
              file=sys.stderr, flush=True)
    raise SystemExit(f"keel train failed {attempts} times; log {log}")


def summarize(records: list[dict]) -> dict:
    """One run's figures from its metrics.jsonl records."""
    steps = [r for r in records if "reward/mean" in r]
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    curve = lambda key: [r.get(key) for r in steps]  # noqa: E731
    finite = lambda xs: [x for x in xs if x is not None]  # noqa: E731
    mean = lambda xs: statistics.fmean(finite(xs)) if finite(xs) else None  # noqa: E731
    return {
        "accuracy_before": evals[0][1] if evals else None,
        "final_accuracy": evals[-1][1] if evals else None,
        "best_accuracy": max(a for _, a in evals) if evals else None,
        "eval_curve": evals,
        "reward_curve": curve("reward/mean"),
        "mismatch_curve": curve("logp_mismatch_first"),
        "logp_mismatch": mean(curve("logp_mismatch_first")),
        "routing_agreement": mean(curve("routing_agreement")),
        "masked_seq_frac": mean(curve("masked_seq_frac")),
        "kl_ref": mean(curve("kl")),
        "grad_norm_spikes": grad_norm_spikes(finite(curve("grad_norm"))),
        "grad_norm_max": max(finite(curve("grad_norm")), default=None),
        "collapsed": collapsed(curve("reward/mean")),
    }


def probe_runs(rows: list[dict], config: str, prompts_n: int) -> None:
    """The mismatch at the end of each run (`mismatch_probe`), one bf16 engine for all of them: each run's final
    weights are loaded into it in turn, and its held-out prompts are sampled as in training."""
    import torch
    from omegaconf import OmegaConf

    from rl.loop.driver import Run
    from rl.loop.metrics import mismatch_probe
    from rl.model.checkpoint import load_model
    from rollout import weight_sync
    from rollout.config import EngineConfig
    from rollout.worker import RolloutWorker

    first = Path(rows[0]["run_dir"])
    cfg = OmegaConf.load(first / "config.yaml")
    run = Run(cfg, first)
    engine = EngineConfig.of({**OmegaConf.to_container(cfg.rollout.engine), "dtype": "bfloat16"})
    sampling = {k: v for k, v in run.sampling(0).items() if k != "logprobs_candidates"}
    worker = RolloutWorker(str(first / "init" / "model"), engine)
    try:
        for version, row in enumerate(rows, start=1):
            final = max((Path(row["run_dir"]) / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
            model = load_model(final / "model").eval()
            handle = weight_sync.publish_weights({k: v.detach().clone() for k, v in model.state_dict().items()},
                                                 version)
            try:
                worker.update_weights(handle, version)
            finally:
                weight_sync.release_weights(handle)
            prompts = run.task.eval_prompts[:prompts_n]
            torch.manual_seed(0)
            row["probe"] = mismatch_probe(worker, model, prompts, sampling, delta=cfg.grpo.offpolicy_delta or 0.5)
            print(f"probe {row['variant']} seed {row['seed']}: {json.dumps(row['probe'])}", flush=True)
    finally:
        worker.shutdown()


def late_reward(row: dict) -> float:
    """The run's mean training reward over its last LATE_STEPS steps: far more samples than the held-out accuracy."""
    return statistics.fmean(row["reward_curve"][-LATE_STEPS:])


def paired_effects(rows: list[dict], variant: str) -> dict:
    """The variant against its control (CONTROL, else all_on) on the seeds both ran: mean and standard error of the
    per-seed differences in final held-out accuracy and in late training reward (`paired_difference`)."""
    control = CONTROL.get(variant, "all_on")
    by_seed = {r["seed"]: r for r in rows if r["variant"] == control}
    pairs = [(r, by_seed[r["seed"]]) for r in rows if r["variant"] == variant and r["seed"] in by_seed]
    if variant == control or not pairs:
        return {}
    acc = paired_difference([t["final_accuracy"] for t, _ in pairs], [c["final_accuracy"] for _, c in pairs])
    reward = paired_difference([late_reward(t) for t, _ in pairs], [late_reward(c) for _, c in pairs])
    return {"control": control, "pairs": len(pairs), "delta_final_accuracy": list(acc),
            "delta_late_reward": list(reward)}


def aggregate(rows: list[dict], variants: list[str]) -> dict[str, dict]:
    """Per variant, over seeds: means of the figures, collapsed runs counted, the paired effect against its
    control."""
    table = {}
    for v in variants:
        runs = [r for r in rows if r["variant"] == v]
        if not runs:
            continue
        entry = {"seeds": len(runs), "collapsed": sum(r["collapsed"] for r in runs),
                 "late_reward": statistics.fmean(late_reward(r) for r in runs), **paired_effects(rows, v)}
        for key in ("accuracy_before", "final_accuracy", "best_accuracy", "logp_mismatch", "routing_agreement",
                    "masked_seq_frac", "grad_norm_spikes", "kl_ref"):
            entry[key] = statistics.fmean(r[key] for r in runs if r.get(key) is not None)
        entry["grad_norm_max"] = max(r["grad_norm_max"] for r in runs)  # the largest over seeds: spikes are rare
        entry["final_accuracy_range"] = [min(r["final_accuracy"] for r in runs),
                                         max(r["final_accuracy"] for r in runs)]
        probes = [r["probe"] for r in runs if "probe" in r]
        if probes:
            entry["probe_kl_k3"] = statistics.fmean(p["logp_mismatch"]["kl_k3"] for p in probes)
            entry["probe_routing_agreement"] = statistics.fmean(p["routing_agreement"] for p in probes)
            entry["probe_kept_set_disagreement"] = statistics.fmean(p.get("kept_set_disagreement", 0.0)
                                                                    for p in probes)
        table[v] = entry
    return table


def print_table(table: dict[str, dict]) -> None:
    print(f"\n{'variant':<24} {'seeds':>5} {'acc before':>10} {'final acc':>15} {'best acc':>8} {'late rew':>8} "
          f"{'|dlogp|':>8} {'routing':>8} {'masked':>7} {'spikes':>6} {'max |g|':>7} {'collapsed':>9} {'probe KL':>9}")
    for v, e in table.items():
        lo, hi = e["final_accuracy_range"]
        kl = f"{e['probe_kl_k3']:.2e}" if "probe_kl_k3" in e else "-"
        print(f"{v:<24} {e['seeds']:>5} {e['accuracy_before']:>10.3f} {e['final_accuracy']:>6.3f} "
              f"({lo:.2f}-{hi:.2f}) {e['best_accuracy']:>8.3f} {e['late_reward']:>8.3f} {e['logp_mismatch']:>8.4f} "
              f"{e['routing_agreement']:>8.4f} {e['masked_seq_frac']:>7.4f} {e['grad_norm_spikes']:>6.1f} "
              f"{e['grad_norm_max']:>7.2f} {e['collapsed']:>4}/{e['seeds']:<4} {kl:>9}")
    effects = {v: e for v, e in table.items() if "control" in e}
    if effects:
        print(f"\npaired over seeds (variant - control, seed by seed; +- one standard error; late reward: the last "
              f"{LATE_STEPS} steps' training reward)")
        print(f"{'variant':<24} {'control':<10} {'pairs':>5} {'d final acc':>18} {'d late reward':>18}")
        for v, e in effects.items():
            (da, sa), (dr, sr) = e["delta_final_accuracy"], e["delta_late_reward"]
            print(f"{v:<24} {e['control']:<10} {e['pairs']:>5} {da:>+9.3f} +- {sa:<6.3f} {dr:>+9.3f} +- {sr:<6.3f}")


def plot(rows: list[dict], variants: list[str], path: str) -> None:
    """Training reward (10-step mean) and the trainer's first-forward mismatch over steps, mean over seeds: the
    default variants in the left column, and the stale-weights ones (if any ran) beside all_on in the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fresh = {*DEFAULT_VARIANTS, "fp32_engine"}  # the engine serves the trainer's current weights
    groups = [[v for v in variants if v in fresh], [v for v in variants if v == "all_on" or v not in fresh]]
    groups = [g for g in groups if g and g != ["all_on"]]
    fig, axes = plt.subplots(2, len(groups), figsize=(8 * len(groups), 7), sharex=True, squeeze=False)
    for (top, bottom), group in zip(axes.T, groups, strict=True):
        most = max(sum(r["variant"] == v for r in rows) for v in group)
        for v in group:
            runs = [r for r in rows if r["variant"] == v]
            if not runs:
                continue
            if len(runs) < most:  # a mean over other seeds than the rest's: only its mismatch is comparable
                n = min(len(r["mismatch_curve"]) for r in runs)
                gap = [statistics.fmean(r["mismatch_curve"][t] for r in runs) for t in range(n)]
                bottom.plot(range(1, n + 1), gap, linestyle="--", label=f"{v} ({len(runs)} of {most} seeds)")
                continue
            n = min(len(r["reward_curve"]) for r in runs)
            reward = [statistics.fmean(r["reward_curve"][t] for r in runs) for t in range(n)]
            smooth = [statistics.fmean(reward[max(0, t - 9) : t + 1]) for t in range(n)]
            gap = [statistics.fmean(r["mismatch_curve"][t] for r in runs) for t in range(n)]
            steps = list(range(1, n + 1))
            (line,) = top.plot(steps, smooth, label=f"{v} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            bottom.plot(steps, gap, color=line.get_color(), label=v)
        top.set_ylabel("training reward (10-step mean)")
        bottom.set_ylabel("mean |log p_engine - log p_trainer|")
        bottom.set_yscale("log")
        bottom.set_xlabel("GRPO step")
        top.legend(fontsize=8)
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=8)
        stale = any(v not in fresh for v in group)
        top.set_title("bf16 engine, fp32 trainer" + (", stale weights" if stale else "") + " (mean over seeds)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def run_all(args: argparse.Namespace, output_dir: Path) -> list[dict]:
    rows = []
    for seed in args.seeds:
        seeds = [f"run.seed={seed}", f"model.seed={seed}", f"data.seed={seed}"]
        t = time.perf_counter()
        done = sorted((output_dir / f"seed{seed}" / "sft").glob("*/init/model/config.json"))
        if done:  # --output-dir of an earlier ablation: its warm start serves new variants too
            sft = done[-1].parent.parent.parent
        else:
            sft = keel_train(args.config, output_dir / f"seed{seed}" / "sft",
                             [*seeds, "run.steps=0", *args.overrides], output_dir / f"seed{seed}-sft.log")
        print(f"seed {seed}: warm start {sft} ({time.perf_counter() - t:.0f} s)", flush=True)
        for variant in args.variants:
            t = time.perf_counter()
            run_dir = keel_train(args.config, output_dir / f"seed{seed}" / variant,
                                 [*seeds, f"model.checkpoint={sft / 'init' / 'model'}", "sft.steps=0",
                                  f"run.steps={args.steps}", *VARIANTS[variant], *args.overrides],
                                 output_dir / f"seed{seed}-{variant}.log")
            row = {"variant": variant, "seed": seed, "run_dir": str(run_dir), "wall_s": time.perf_counter() - t,
                   **summarize(read_metrics(run_dir))}
            rows.append(row)
            print(f"seed {seed} {variant}: accuracy {row['accuracy_before']:.3f} -> {row['final_accuracy']:.3f} "
                  f"(best {row['best_accuracy']:.3f}), |dlogp| {row['logp_mismatch']:.4f}, routing "
                  f"{row['routing_agreement']:.4f}, masked {row['masked_seq_frac']:.4f}, spikes "
                  f"{row['grad_norm_spikes']}, collapsed {row['collapsed']}, {row['wall_s']:.0f} s", flush=True)
    if args.probe:
        probe_runs(rows, args.config, args.probe_prompts)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ablation.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100, help="GRPO steps per run")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--no-probe", dest="probe", action="store_false", help="skip the end-of-run mismatch probe")
    ap.add_argument("--probe-prompts", type=int, default=32)
    ap.add_argument("--output-dir", help="keep the runs here (default: a temporary directory, removed afterwards)")
    ap.add_argument("--json", help="also write every run's figures and the table to this file")
    ap.add_argument("--from-json", nargs="+", help="print (and plot) the table of runs written before by --json "
                    "(several files: their runs together, e.g. one seed each); no runs")
    ap.add_argument("--plot", help="save the reward and mismatch curves as a PNG here (needs matplotlib)")
    ap.add_argument("overrides", nargs="*", help="omegaconf dot-list overrides for every run (after --)")
    args = ap.parse_args()

    start = time.perf_counter()
    if args.from_json:
        saved = [json.loads(Path(path).read_text()) for path in args.from_json]
        rows = [row for s in saved for row in s["runs"]]
        variants = list(dict.fromkeys(v for s in saved for v in s["table"]))
    else:
        variants = args.variants
        keep = args.output_dir is not None
        output_dir = Path(args.output_dir) if keep else Path(tempfile.mkdtemp(prefix="keel-ablation-"))
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            rows = run_all(args, output_dir)
        finally:
            if not keep:
                shutil.rmtree(output_dir, ignore_errors=True)
    table = aggregate(rows, variants)
    print_table(table)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "config": args.config, "seeds": args.seeds, "steps": args.steps, "overrides": args.overrides,
            "wall_s": time.perf_counter() - start, "table": table, "runs": rows,
        }, indent=1))
    if args.plot:
        plot(rows, variants, args.plot)


if __name__ == "__main__":
    main()
