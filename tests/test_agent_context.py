"""Context management: what each strategy keeps of a long tool-use trajectory, and what it counts."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from rl.model.tokenizer import CharTokenizer
from rollout.agent.context import SUMMARY_PREFIX, context_metrics, make_room, split_history, summary_input
from rollout.agent.deepseek_v32 import EOS
from rollout.agent.environments.base import PLAIN_CHARS
from rollout.agent.messages import Message, ToolCall
from rollout.agent.summary import SUMMARY_INSTRUCTION, ModelSummarizer, read_summary
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


def test_summary_input_is_what_make_room_summarises():
    seen = []
    first, _ = make_room(LONG, "summary", lambda m: "first")
    for messages in (LONG, first + rounds(2, start=9)):
        make_room(messages, "summary", lambda m: seen.append(m) or "x")
        assert seen[-1] == summary_input(messages)
    assert summary_input(HEAD) == []


# ---- the model-written summary: its request and how its answer is read --------------------------------


class PieceTokenizer:
    """A stand-in for the V3.2 Hugging Face tokenizer: one id per character, one per special token."""

    eos_token_id = 0
    _pieces = re.compile(r"<｜[^｜]*｜>|.", re.DOTALL)

    def __init__(self):
        self.vocab = {EOS: 0}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in self._pieces.findall(text)]


LAYOUTS = pytest.mark.parametrize("template, tokenizer", [(CompactTemplate(), CharTokenizer()),
                                                          (DeepSeekV32Template(), PieceTokenizer())],
                                  ids=["compact", "deepseek"])
ASK = [Message("user", SUMMARY_INSTRUCTION)]
SUMMARY_TOKENS = 30


def summarizer(template, tokenizer, budget: int, engine=None) -> ModelSummarizer:
    return ModelSummarizer(engine, template, tokenizer, {"max_tokens": SUMMARY_TOKENS}, max_total_tokens=budget)


def test_the_instruction_is_plain_compact_text():
    assert set(SUMMARY_INSTRUCTION) <= PLAIN_CHARS


@LAYOUTS
def test_a_summary_request_is_the_dropped_part_then_the_instruction(template, tokenizer):
    dropped = summary_input(LONG)
    summary = summarizer(template, tokenizer, budget=10_000)
    prompt = summary.request(dropped)
    assert prompt == template.encode(dropped + ASK, tokenizer, add_generation_prompt=True)
    text = template.render(dropped + ASK)
    # Not the head: the model summarises the steps, with every call and result it made.
    assert "be brief" not in text and "find the year" not in text
    assert all(f"q{k}0" in text and f"result {k}0" in text for k in range(1, 9))
    assert text.endswith({"compact": f"u:{SUMMARY_INSTRUCTION}|a:<",
                          "deepseek_v32": f"{SUMMARY_INSTRUCTION}<｜Assistant｜><think>"}[template.name])
    assert summary.counts["trimmed"] == 0


@LAYOUTS
def test_a_long_dropped_part_keeps_its_most_recent_messages_that_fit(template, tokenizer):
    dropped = summary_input(LONG)
    budget = len(template.encode(dropped[7:] + ASK, tokenizer)) + SUMMARY_TOKENS
    summary = summarizer(template, tokenizer, budget)
    prompt = summary.request(dropped)
    assert prompt == template.encode(dropped[7:] + ASK, tokenizer)  # a tool result and the last 4 rounds
    assert len(prompt) + SUMMARY_TOKENS <= budget
    assert len(template.encode(dropped[6:] + ASK, tokenizer)) + SUMMARY_TOKENS > budget
    assert summary.counts["trimmed"] == 1


def test_no_request_when_not_even_the_last_message_fits():
    template, tokenizer = CompactTemplate(), CharTokenizer()
    budget = len(template.encode(ASK, tokenizer)) + SUMMARY_TOKENS  # the instruction alone, nothing to summarise
    summary = summarizer(template, tokenizer, budget)  # no engine: it must not be called
    assert summary.request(summary_input(LONG)) is None
    assert summary(summary_input(LONG)) == ""
    assert summary.counts == {"requests": 0, "calls": 0, "prompt_tokens": 0, "tokens": 0, "trimmed": 2}


class ScriptedEngine:
    """A RolloutClient stand-in: answers the i-th prompt of a call with the i-th scripted turn."""

    def __init__(self, turns: list[str]):
        self.turns, self.calls = turns, []

    def generate(self, prompts: list[list[int]], sampling: dict, policy_version: int) -> pa.RecordBatch:
        self.calls.append((prompts, sampling, policy_version))
        ids = [CharTokenizer().encode(turn, bos=False) for turn in self.turns[: len(prompts)]]
        return pa.record_batch({"response_ids": pa.array(ids, pa.list_(pa.int32()))})


def test_the_summaries_of_several_conversations_take_one_generate_call():
    template, tokenizer = CompactTemplate(), CharTokenizer()
    engine = ScriptedEngine(["thought>kelm is 42 ..|", "looked twice>|", "no end of turn <|> here"])
    summary = ModelSummarizer(engine, template, tokenizer, {"max_tokens": 30, "seed": 5}, max_total_tokens=500,
                              policy_version=3)
    conversations = [summary_input(LONG), [], summary_input(HEAD + rounds(2)), rounds(1)]
    assert summary.summarize_many(conversations) == ["kelm is 42 ..", "", "looked twice", "no end of turn"]
    [(prompts, sampling, version)] = engine.calls
    assert prompts == [template.encode(c + ASK, tokenizer) for c in conversations if c]
    assert version == 3 and sampling["n"] == 1 and sampling["seed"] == 5
    assert set(sampling["stop_token_ids"]) == {tokenizer.eos_id, tokenizer.encode("|", bos=False)[0]}
    assert summary.counts == {"requests": 3, "calls": 1, "prompt_tokens": sum(map(len, prompts)),
                              "tokens": sum(len(t) for t in engine.turns), "trimmed": 0}


@pytest.mark.parametrize("template, text, expected", [
    (CompactTemplate(), "thought>the code of kelm is 42.|", "the code of kelm is 42."),
    (CompactTemplate(), "looked up kelm, then zorb>|", "looked up kelm, then zorb"),  # no content: the reasoning
    (CompactTemplate(), "cut off before the end", "cut off before the end"),
    (CompactTemplate(), "r>found<look(key|", "found"),  # a broken tool call: the content before it
    (CompactTemplate(), "", ""),
    (DeepSeekV32Template(), f"plan</think>Found:\n  KELM is 42.{EOS}", "found: kelm is 42."),
    (DeepSeekV32Template(), "<｜DSML｜invoke name=\"x\"> never closed", "dsml invoke name= x never closed"),
], ids=["content", "reasoning", "truncated", "bad-call", "empty", "v32", "v32-garbage"])
def test_a_summary_is_read_from_any_turn_without_raising(template, text, expected):
    assert read_summary(template, text) == expected


def test_a_summary_is_cut_to_its_bound():
    summary = read_summary(CompactTemplate(), "r>" + "found it. " * 50 + "|", max_chars=25)
    assert summary == "found it. found it. found" and len(summary) <= 25
