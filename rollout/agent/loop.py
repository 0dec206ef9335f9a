"""Multi-turn rollouts: many tool-using episodes in flight at once against the same engines.

`run_episodes` plays one episode per environment: it sends an episode's next prompt to the engine (n=1,
batched with the other episodes' requests in one `generate` call), parses the turn, runs its tool calls in the
environment (code tools run in the rewards sandbox), appends the results and goes on, up to `max_turns`
assistant turns and `max_total_tokens` tokens of context. Each episode becomes one RolloutBatch row.

- `rollout.agent.episode`: one episode's token stream and steps (token in, token out; routing stitched
  across turns; the context budget; why an episode ends; its reward).
- `rollout.agent.schedule`: when each episode is served. By default episodes advance independently (an
  episode's tool calls run while the engine decodes the others' turns); `schedule="rounds"` plays synchronous
  rounds (every unfinished episode's next turn in one call, then all tool calls). Seeds are per episode and
  turn, so both play the same episodes.

With the "summary" context strategy the policy writes the summary (`rollout.agent.summary.ModelSummarizer`):
the summary requests of the episodes waiting for one go in one more `generate` call, then each restarts from its
head and its summary. The summary turns are not part of any row (nothing is trained on them); the metrics
count them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from rl.algo.batch import append_columns, make_rollout_batch
from rollout.agent.context import ContextStrategy, context_metrics
from rollout.agent.environments.base import Environment
from rollout.agent.episode import (
    CONTEXT,
    MAX_TURNS,
    PARSE_ERROR,
    STOP,
    TRUNCATED,
    Episode,
    Rules,
    Segment,
    continue_episode,
    episode_row,
    read_turn,
    start_episode,
)
from rollout.agent.messages import Message
from rollout.agent.schedule import GATHER_S, Schedule, Scheduler, gather_seconds
from rollout.agent.summary import SUMMARY_COUNTERS, ModelSummarizer, summary_counts
from rollout.agent.template import ChatTemplate
from rollout.agent.tokens import turn_sampling

# The episode's parts, importable from here as before the split.
__all__ = ["CONTEXT", "MAX_TURNS", "PARSE_ERROR", "STOP", "TRUNCATED", "Episode", "Segment", "continue_episode",
           "episode_metrics", "episode_row", "read_turn", "run_episodes"]


# ---- the loop ----------------------------------------------------------------------------------------


def run_episodes(
    engine: Any,
    envs: list[Environment],
    template: ChatTemplate,
    tokenizer: Any,
    sampling: dict,
    max_turns: int,
    max_total_tokens: int,
    context_strategy: ContextStrategy = "none",
    policy_version: int = 0,
    prompt_indices: list[int] | None = None,
    system_prompt: str | None = None,
    summarize: Callable[[list[Message]], str] | None = None,
    schedule: Schedule = "independent",
    gather_s: float = GATHER_S,
) -> tuple[pa.RecordBatch, dict[str, float]]:
    """Play one episode per environment; one RolloutBatch row per episode, in `envs` order, and metrics.

    engine: anything with `generate(prompts, sampling, policy_version, prompt_indices)` (a `RolloutClient` or a
    `RolloutWorker`: one signature). sampling: as for `generate` (n is forced to 1, the template's stop tokens
    are added; the engine offsets "seed" per request by `schedule.request_key`, a function of episode and turn).
    prompt_indices: the GRPO group of each episode (default: its position); sample_index counts within.
    summarize: writes the summary for the "summary" strategy; default: the model on `engine`
    (`ModelSummarizer`), the summaries waiting together in one generate call. `tool_results_summary` is a
    model-free alternative. Metrics `context/summary_*` count the model's summary requests, generate
    calls, prompt and generated tokens, and requests that kept only the most recent messages.
    schedule: "independent" or "rounds", gather_s: the least a free engine waits for running tool calls
    (independent only; at most its last call's duration otherwise); see `rollout.agent.schedule`.
    `agent/generate_calls` counts the calls that generated turns.
    Rows carry reward (`env.verify` of the final answer, 0 without one), reward_reason and
    finish_reason, plus columns `turns`, `tool_calls` and `segments`.
    """
    if max_turns < 1 or not envs:
        raise ValueError(f"need max_turns >= 1 and at least one environment, got {max_turns} and {len(envs)}")
    prompt_indices = list(range(len(envs))) if prompt_indices is None else list(prompt_indices)
    if len(prompt_indices) != len(envs):
        raise ValueError(f"{len(envs)} environments but {len(prompt_indices)} prompt_indices")
    gather = gather_seconds(schedule, gather_s)
    base = turn_sampling(sampling, template, tokenizer)
    if summarize is None and context_strategy == "summary":
        summarize = ModelSummarizer(engine, template, tokenizer, base, max_total_tokens, policy_version)
    rules = Rules(template, tokenizer, max_turns, sampling.get("max_tokens", 16), max_total_tokens, context_strategy,
                  summarize)
    summaries_before = summary_counts(summarize)
    calls_before = [(env.tool_calls, env.tool_errors) for env in envs]
    episodes = [start_episode(env, rules, system_prompt, index) for index, env in enumerate(envs)]
    scheduler = Scheduler(engine, episodes, base, policy_version, rules, gather)
    schema = scheduler.run()

    rows, seen = [], {}
    for episode, group in zip(episodes, prompt_indices, strict=True):
        rows.append(episode_row(episode, group, seen.get(group, 0), policy_version))
        seen[group] = seen.get(group, 0) + 1
    tool_calls = [env.tool_calls - c for env, (c, _) in zip(envs, calls_before, strict=True)]
    tool_errors = [env.tool_errors - e for env, (_, e) in zip(envs, calls_before, strict=True)]
    batch = append_columns(make_rollout_batch(rows, schema), turns=[e.turns for e in episodes],
                           tool_calls=tool_calls, segments=[e.segments for e in episodes])
    metrics = episode_metrics(episodes, rows, tool_calls, tool_errors)
    metrics["agent/generate_calls"] = float(sum(kind == "turns" for kind, _ in scheduler.calls))
    summaries_after = summary_counts(summarize)
    metrics.update({f"context/summary_{name}": float(summaries_after[name] - summaries_before[name])
                    for name in SUMMARY_COUNTERS})
    return batch, metrics


def episode_metrics(episodes: list[Episode], rows: list[dict], tool_calls: list[int],
                    tool_errors: list[int]) -> dict[str, float]:
    """Means per episode (turns, tool calls, lengths, reward), totals of errors, ends and context uses."""
    n = max(len(episodes), 1)
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
    metrics = {
        "agent/episodes": float(len(episodes)),
        "agent/turns": sum(e.turns for e in episodes) / n,
        "agent/max_turns_used": float(max((e.turns for e in episodes), default=0)),
        "agent/tool_calls": sum(tool_calls) / n,
        "agent/tool_errors": float(sum(tool_errors)),
        "agent/parse_errors": float(sum(e.finish_reason == PARSE_ERROR for e in episodes)),
        "agent/episode_length": sum(lengths) / n,
        "agent/generated_tokens": sum(sum(r["loss_mask"]) for r in rows) / n,
        "agent/reward": sum(r["reward"] for r in rows) / n,
        "agent/routing_replay_mismatch": float(sum(e.routing_mismatch + e.segment.routing_mismatch for e in episodes)),
    }
    for reason in (STOP, MAX_TURNS, CONTEXT, TRUNCATED, PARSE_ERROR):
        metrics[f"agent/finish_{reason}"] = float(sum(e.finish_reason == reason for e in episodes))
    metrics.update(context_metrics([r for e in episodes for r in e.context_records]))
    return metrics
