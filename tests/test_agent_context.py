"""Context management: what each strategy keeps of a long tool-use trajectory, and what it counts."""

from __future__ import annotations

import pytest

from rollout.agent.context import SUMMARY_PREFIX, context_metrics, make_room, split_history
from rollout.agent.messages import Message, ToolCall
from rollout.agent.template import CompactTemplate, DeepSeekV32Template

HEAD = [Message("system", "be brief."), Message("user", "find the year")]


def rounds(n: int, results_per_round: int = 1, start: int = 1) -> list[Message]:
    """n rounds: assistant turn k (reasoning "rk", one call per result) and its tool results."""
    messages = []
    for k in range(start, start + n):
        calls = [ToolCall("search", {"query": f"q{k}{j}"}) for j in range(results_per_round)]
        messages.append(Message("assistant", "", f"r{k}", calls))
        messages += [Message("tool", f"result {k}{j}") for j in range(results_per_round)]
    return messages


def reasonings(messages: list[Message]) -> list[str | None]:
    return [m.reasoning_content for m in messages if m.role == "assistant"]


LONG = HEAD + rounds(8)


def test_split_history_groups_each_call_with_its_results():
    head, groups = split_history(HEAD + rounds(2, results_per_round=3))
    assert head == HEAD
    assert [[m.role for m in g] for g in groups] == [["assistant", "tool", "tool", "tool"]] * 2


def test_discard_75_drops_the_first_three_quarters_of_the_rounds():
    context, record = make_room(LONG, "discard_75")
    assert context[:2] == HEAD
    assert reasonings(context) == ["r7", "r8"]  # kept rounds keep their reasoning
    assert [m.content for m in context if m.role == "tool"] == ["result 70", "result 80"]
    assert record == {"strategy": "discard_75", "applied": True, "dropped_rounds": 6,
                      "dropped_messages": 12, "kept_rounds": 2, "summary_chars": 0}


@pytest.mark.parametrize("n, dropped", [(1, 1), (2, 1), (3, 2), (4, 3), (8, 6), (10, 7)])
def test_discard_75_always_drops_at_least_one_round(n, dropped):
    context, record = make_room(HEAD + rounds(n), "discard_75")
    assert record["dropped_rounds"] == dropped
    assert reasonings(context) == [f"r{k}" for k in range(dropped + 1, n + 1)]


def test_discard_75_never_separates_results_from_their_call():
    context, _ = make_room(HEAD + rounds(4, results_per_round=2), "discard_75")
    assert [m.role for m in context] == ["system", "user", "assistant", "tool", "tool"]
    assert context[2].reasoning_content == "r4"


def test_discard_all_keeps_only_the_task():
    context, record = make_room(LONG, "discard_all")
    assert context == HEAD
    assert (record["dropped_rounds"], record["dropped_messages"], record["kept_rounds"]) == (8, 16, 0)


def test_summary_restarts_from_the_task_and_the_summary():
    seen = []

    def summarize(messages: list[Message]) -> str:
        seen.append(messages)
        return "r1 to r8 found nothing"

    context, record = make_room(LONG, "summary", summarize)
    assert seen == [LONG[2:]]
    assert context == [*HEAD, Message("user", SUMMARY_PREFIX + "r1 to r8 found nothing")]
    assert record["summary_chars"] == len("r1 to r8 found nothing") and record["dropped_rounds"] == 8


def test_a_second_summary_folds_in_the_first():
    first, _ = make_room(LONG, "summary", lambda m: "first")
    seen = []
    context, record = make_room(first + rounds(2, start=9), "summary", lambda m: seen.append(m) or "second")
    assert seen[0][0] == Message("user", SUMMARY_PREFIX + "first")
    assert reasonings(seen[0]) == ["r9", "r10"]
    assert context == [*HEAD, Message("user", SUMMARY_PREFIX + "second")]


def test_later_user_messages_belong_to_the_head():
    messages = HEAD + rounds(2) + [Message("user", "and the city?")] + rounds(4, start=3)
    context, record = make_room(messages, "discard_all")
    assert context == messages[:7]
    assert record["dropped_rounds"] == 4


@pytest.mark.parametrize("strategy", ["summary", "discard_75", "discard_all", "none"])
def test_no_history_means_no_room_made(strategy):
    context, record = make_room(HEAD, strategy, lambda m: "unused")
    assert context == HEAD and not record["applied"]


def test_none_changes_nothing():
    context, record = make_room(LONG, "none")
    assert context == LONG and not record["applied"] and record["kept_rounds"] == 8


def test_bad_configuration_is_an_error():
    with pytest.raises(ValueError, match="summarize"):
        make_room(LONG, "summary")
    with pytest.raises(ValueError, match="unknown context strategy"):
        make_room(LONG, "discard_50")


@pytest.mark.parametrize("strategy", ["summary", "discard_75", "discard_all"])
@pytest.mark.parametrize("template", [DeepSeekV32Template(), CompactTemplate()], ids=["deepseek", "compact"])
def test_made_room_renders_shorter_and_opens_a_turn(strategy, template):
    context, _ = make_room(LONG, strategy, lambda m: "nothing yet")
    before, after = template.render(LONG), template.render(context)
    assert len(after) < len(before)
    opener = {"deepseek_v32": "<think>", "compact": "a:<"}[template.name]
    assert after.endswith(opener)  # the episode continues: a new assistant turn is open


def test_metrics_count_every_use():
    records = [make_room(LONG, s, lambda m: "x")[1] for s in ("summary", "discard_75", "discard_75", "none")]
    records.append(make_room(HEAD, "discard_all")[1])  # nothing to drop: not a use
    metrics = context_metrics(records)
    assert metrics["context/uses"] == 3
    assert metrics["context/summary_uses"] == 1 and metrics["context/discard_75_uses"] == 2
    assert metrics["context/discard_all_uses"] == 0
    assert metrics["context/dropped_rounds"] == 8 + 6 + 6
