"""Test-time context management: make room when a trajectory would overflow its context budget.

The conversation is split into the head (everything up to and including the last user message:
system prompt and task) and the tool-call history after it, grouped into rounds (one assistant
turn and the tool results that answer it, so a result never loses its call). Strategies
(DeepSeek-V3.2, section 5):

- "summary": the whole history is summarised by the injected `summarize` (in the rollout loop, the
  model itself: `loop.ModelSummarizer`) and the episode restarts from the head plus one user message
  holding that summary. A summary left by an earlier use is summarised again with the history, so
  summaries do not pile up; `summary_input` is exactly what `summarize` is given.
- "discard_75": drop the first 75% of the rounds (at least one), keep the rest.
- "discard_all": drop every round; the episode restarts from the task.
- "none": change nothing; the caller ends the episode.

A record says what was done; `applied` is False (and nothing changed) when there was nothing to
drop, so the caller knows no room was made. `context_metrics` sums records for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from rollout.agent.messages import Message, last_user_index

ContextStrategy = Literal["summary", "discard_75", "discard_all", "none"]
STRATEGIES: tuple[str, ...] = ("summary", "discard_75", "discard_all", "none")
SUMMARY_PREFIX = "summary of earlier steps: "
DISCARD_FRACTION = 0.75


def split_history(messages: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """(head, rounds): the head ends with the last user message; each round starts at an assistant turn."""
    cut = last_user_index(messages) + 1
    head, rounds = list(messages[:cut]), []
    for message in messages[cut:]:
        if message.role == "assistant" or not rounds:
            rounds.append([])
        rounds[-1].append(message)
    return head, rounds


def _is_summary(message: Message) -> bool:
    return message.role == "user" and message.content.startswith(SUMMARY_PREFIX)


def _fold_summary(head: list[Message], dropped: list[Message]) -> tuple[list[Message], list[Message]]:
    """Move a summary left by an earlier use from the head into what is summarised now."""
    if dropped and head and _is_summary(head[-1]):
        # The previous summary is part of what overflowed: fold it into the new one.
        return head[:-1], [head[-1], *dropped]
    return head, dropped


def summary_input(messages: list[Message]) -> list[Message]:
    """What the summary strategy asks `summarize` to summarise: the history after the head, preceded by
    an earlier summary if there is one; empty when there is no history (then nothing is summarised).

    Lets a caller write the summaries of several conversations at once (one batched model call) and
    then hand each to `make_room`.
    """
    head, rounds = split_history(messages)
    return _fold_summary(head, [m for r in rounds for m in r])[1]


def make_room(messages: list[Message], strategy: ContextStrategy,
              summarize: Callable[[list[Message]], str] | None = None) -> tuple[list[Message], dict]:
    """The shortened context and a record of what was done; see the module docstring for the rules."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context strategy {strategy!r}; expected one of {STRATEGIES}")
    head, rounds = split_history(messages)
    drop = {"none": 0, "discard_all": len(rounds), "summary": len(rounds),
            "discard_75": max(1, int(DISCARD_FRACTION * len(rounds))) if rounds else 0}[strategy]
    dropped = [m for r in rounds[:drop] for m in r]
    kept = [m for r in rounds[drop:] for m in r]
    record = {"strategy": strategy, "applied": bool(dropped), "dropped_rounds": drop,
              "dropped_messages": len(dropped), "kept_rounds": len(rounds) - drop, "summary_chars": 0}
    if not dropped:
        return list(messages), record
    if strategy == "summary":
        if summarize is None:
            raise ValueError("the summary strategy needs a summarize function")
        head, dropped = _fold_summary(head, dropped)
        summary = summarize(dropped)
        record["summary_chars"] = len(summary)
        return [*head, Message("user", SUMMARY_PREFIX + summary)], record
    return [*head, *kept], record


def context_metrics(records: list[dict]) -> dict[str, float]:
    """Sums for logging: uses in all and per strategy, rounds and messages dropped."""
    applied = [r for r in records if r["applied"]]
    metrics = {
        "context/uses": float(len(applied)),
        "context/dropped_rounds": float(sum(r["dropped_rounds"] for r in applied)),
        "context/dropped_messages": float(sum(r["dropped_messages"] for r in applied)),
    }
    for strategy in STRATEGIES[:-1]:
        metrics[f"context/{strategy}_uses"] = float(sum(r["strategy"] == strategy for r in applied))
    return metrics
