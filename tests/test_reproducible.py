"""The same seed gives the same numbers on one machine: two short quickstart runs agree to the last bit (weights,
samples, engine log-probs, routing, kept sets, metrics). What used to break it: vLLM's engine core in its own process
batched a step's requests as they happened to arrive (rollout/worker.py; README, "Reproducible on one machine")."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from rl.loop.config import load_config
from rl.loop.driver import train
from rl.loop.metrics import read_metrics

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_the_same_seed_gives_the_same_numbers(tmp_path):
    """Bitwise, on one machine: the engine's batches no longer depend on timing (rollout/worker.py)."""
    overrides = ["run.steps=4", "run.checkpoint_every=4", "run.wandb_mode=disabled", "data.train_size=256",
                 "data.eval_size=16", "sft.steps=100", "rollout.prompts_per_step=8", "grpo.mini_batch_size=32",
                 "run.seed=3", "model.seed=3", "data.seed=3"]
    runs = [train(load_config(QUICKSTART, [*overrides, f"run.output_dir={tmp_path / name}"])) for name in "ab"]
    a, b = runs
    for name in ("init/model", "checkpoints/step_4/model"):
        wa, wb = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
        assert all((wa[k] == wb[k]).all() for k in wa), name
    for step in range(1, 5):
        ta, tb = (pq.read_table(r / "rollouts" / f"step_{step:06d}.parquet") for r in runs)
        for column in ("response_ids", "rollout_logprobs", "reward", "routed_experts", "sampling_mask"):
            assert ta.column(column).equals(tb.column(column)), (step, column)

    def numbers(run):
        return [{k: v for k, v in m.items() if not k.startswith("time/") and not k.endswith("per_s")}
                for m in read_metrics(run)]

    assert numbers(a) == numbers(b)
    assert any(m.get("reward/std", 0) > 0 for m in read_metrics(a))  # the policy had something to learn
