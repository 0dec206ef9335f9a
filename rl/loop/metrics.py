"""Per-step metrics: RUN_DIR/metrics.jsonl (the record) and wandb (offline unless the user opts in).

Every run kind logs through `MetricsLogger`: `keel train` with wandb, the indexer warm-up without (its steps
restart at 0 in each phase, which wandb's step axis cannot show).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rl.algo.mismatch import (
    kept_set_disagreement,
    kept_sets,
    logp_mismatch_distribution,
    offpolicy_fraction,
    routing_agreement_per_layer,
)


def trim_metrics(run_dir: Path, keep: Callable[[dict], bool]) -> None:
    """Keep only the records of RUN_DIR/metrics.jsonl for which `keep(record)` is true (before a resumed run
    repeats the steps after its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Appends one JSON line per record; on resume, records after the resumed checkpoint's step are dropped first
    (they belong to steps that will run again). wandb_mode None: the JSON lines only (WANDB_MODE is not read)."""

    def __init__(self, run_dir: Path, wandb_mode: str | None, project: str, run_name: str, config: dict,
                 resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            trim_metrics(run_dir, lambda record: record.get("step", -1) <= resume_step)
        self._wandb = None
        mode = None if wandb_mode is None else os.environ.get("WANDB_MODE", wandb_mode)
        if mode not in (None, "disabled"):
            import wandb

            run_id_file = run_dir / "wandb_id"
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else secrets.token_hex(4)
            run_id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
                config=config, settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---- train-inference mismatch (the stabiliser ablation, bench/ablation.py) ------------------------------------


def grad_norm_spikes(norms: list[float], factor: float = 3.0) -> int:
    """Steps whose gradient norm (before clipping) exceeds `factor` times the run's median: #{t: g_t > f median(g)}."""
    finite = [g for g in norms if g is not None and math.isfinite(g)]
    if not finite:
        return 0
    median = statistics.median(finite)
    return sum(g > factor * median for g in finite)


def collapsed(rewards: list[float], window: int = 10, fraction: float = 0.5) -> bool:
    """A run collapsed when its smoothed reward ends below `fraction` of its best: with R_t the mean reward of
    steps t-w+1..t, collapsed iff R_T < fraction * max_t R_t (it fell and stayed down to the last step).
    A run whose best is 0 never learned anything and has not collapsed."""
    if len(rewards) < window:
        window = max(len(rewards), 1)
    smooth = [statistics.fmean(rewards[t - window + 1 : t + 1]) for t in range(window - 1, len(rewards))]
    if not smooth or max(smooth) <= 0:
        return False
    return smooth[-1] < fraction * max(smooth)


def paired_difference(treated: list[float], control: list[float]) -> tuple[float, float]:
    """The effect of a switch over seeds whose runs are paired (seed s of both variants shares its warm start and
    its prompts): d_s = treated_s - control_s, returned as (mean d, its standard error stdev(d) / sqrt(n)).
    Pairing removes the seed-to-seed spread both runs share; the error is nan with fewer than two seeds."""
    if len(treated) != len(control) or not treated:
        raise ValueError(f"paired_difference needs one control per treated run, got {len(treated)} and {len(control)}")
    d = [t - c for t, c in zip(treated, control, strict=True)]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return statistics.fmean(d), se


def mismatch_probe(worker: Any, model: Any, prompts: list[list[int]], sampling: dict,
                   delta: float = 0.5) -> dict[str, Any]:
    """Sample `prompts` with a rollout worker (`rollout.worker.RolloutWorker`: the engine, in its dtype) and score
    the same tokens with `model` (keel's Transformer, as the trainer computes: fp32, its own routing, log-probs
    renormalised over the engine's kept sets as under Keep Sampling Mask). The worker must serve `model`'s weights.

    Returns routing agreement per MoE layer and overall, kept-set disagreement (the trainer's own top-k/top-p set
    against the engine's), the |log-prob| mismatch distribution and the train-inference KL
    (`logp_mismatch_distribution`), and the fraction of sequences past the off-policy threshold `delta`."""
    from rl.algo.logprobs import token_logprobs
    from trainer.batching import to_train_tensors

    batch = worker.generate(prompts, sampling, policy_version=0)
    data = to_train_tensors(batch, model.config.num_experts_per_tok, with_routing=model.moe_layers > 0,
                            with_mask=True)
    temperature = sampling.get("temperature", 1.0)
    with torch.no_grad():
        out = model(data.input_ids, return_routing=True)
        logp, _ = token_logprobs(out.hidden, model.lm_head.weight, data.targets, data.kept_ids,
                                 temperature=temperature)
        counted = data.response_mask > 0
        fed = (data.targets != 0) | counted  # the tokens the engine ran its routers on
        layers = (routing_agreement_per_layer(data.routing[fed], out.routing[fed]).tolist()
                  if data.routing is not None else [])
        result: dict[str, Any] = {
            "routing_agreement": sum(layers) / len(layers) if layers else float("nan"),
            "routing_agreement_per_layer": layers,
            "logp_mismatch": logp_mismatch_distribution(data.old_logp[counted], logp[counted]),
            "offpolicy_fraction": offpolicy_fraction(data.old_logp, logp, data.response_mask, delta),
            "tokens": int(counted.sum()),
        }
        if data.kept_ids is not None and (data.kept_ids >= 0).any():
            logits = model.logits(out.hidden[counted]) / temperature
            own = kept_sets(logits, sampling.get("top_k", 0), sampling.get("top_p", 1.0))
            result["kept_set_disagreement"] = kept_set_disagreement(data.kept_ids[counted], own)
    return result
