"""Summaries for the "summary" context strategy: written by the policy itself (`ModelSummarizer`, the
summaries waiting together in one generate call) or, without a model, cut from the latest tool results
(`tool_results_summary`). `rollout.agent.loop.run_episodes` uses them when an episode's context overflows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rollout.agent.environments.base import plain
from rollout.agent.messages import Message
from rollout.agent.template import ChatTemplate
from rollout.agent.tokens import decode_ids, fits, turn_sampling

# Short (a summary request must fit small budgets too) and in the compact alphabet without its delimiters,
# so every template, and the tiny character model, can show it.
SUMMARY_INSTRUCTION = "summarize what was tried and found so far."
SUMMARY_MAX_CHARS = 1000
SUMMARY_COUNTERS = ("requests", "calls", "prompt_tokens", "tokens", "trimmed")


def read_summary(template: ChatTemplate, text: str, max_chars: int = SUMMARY_MAX_CHARS) -> str:
    """The summary in a generated turn: its content (its reasoning when the content is empty), plain, on one
    line, at most `max_chars`. Never raises: a malformed or cut-off turn gives what the template could read."""
    parsed = template.parse(text)
    summary = parsed.content.strip() or (parsed.reasoning or "").strip()
    return " ".join(plain(summary).split())[:max_chars].strip()


class ModelSummarizer:
    """A `summarize` for the "summary" strategy whose summaries the model writes, with the episodes' engine.

    The request is the part being dropped followed by a user message with `instruction`; the answer is
    one assistant turn, read by `read_summary`. The template's context rule drops the reasoning of the
    summarised turns (the instruction is a new user message), so the model summarises from its calls,
    contents and tool results, as it would see them after any user message. A request always fits
    `max_total_tokens` with a full turn (sampling["max_tokens"]): when the dropped part is too long, only
    its most recent messages that fit are kept, and when not even the last one fits no request is made
    and the summary is empty.
    Call it on one conversation, or `summarize_many` to write several summaries in one generate call.
    `counts` sums what it did (requests, generate calls, prompt and generated tokens, trimmed requests).
    """

    def __init__(self, engine: Any, template: ChatTemplate, tokenizer: Any, sampling: dict, max_total_tokens: int,
                 policy_version: int = 0, instruction: str = SUMMARY_INSTRUCTION,
                 max_chars: int = SUMMARY_MAX_CHARS):
        self.engine, self.template, self.tokenizer = engine, template, tokenizer
        self.sampling = turn_sampling(sampling, template, tokenizer)
        self.max_tokens = self.sampling.get("max_tokens", 16)
        self.max_total_tokens, self.policy_version = max_total_tokens, policy_version
        self.instruction, self.max_chars = instruction, max_chars
        template.render([Message("user", instruction)])  # a template that cannot show the instruction fails now
        self.counts = dict.fromkeys(SUMMARY_COUNTERS, 0)

    def request(self, dropped: list[Message]) -> list[int] | None:
        """Prompt ids asking for a summary of the most recent messages of `dropped` that fit; None if none do."""
        ask = Message("user", self.instruction)

        def prompt(start: int) -> list[int]:
            return self.template.encode([*dropped[start:], ask], self.tokenizer, add_generation_prompt=True)

        # Binary search for the longest suffix that fits: dropping messages from the front only shortens it.
        lo, hi = 0, len(dropped)  # the answer is in [lo, hi]; hi = len(dropped) means nothing fits
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(len(prompt(mid)), self.max_tokens, self.max_total_tokens):
                hi = mid
            else:
                lo = mid + 1
        self.counts["trimmed"] += int(lo > 0)
        return prompt(lo) if lo < len(dropped) else None

    def summarize_many(self, conversations: list[list[Message]], keys: list[int] | None = None) -> list[str]:
        """One summary per conversation ("" for one with nothing that fits), from at most one generate call.

        keys: each conversation's prompt index for the engine, which seeds its request with it (the agent loop's
        `schedule.request_key`, so a summary's draw does not depend on which others share its call); default
        their positions among the requests sent.
        """
        prompts = [self.request(c) if c else None for c in conversations]
        asked = [p for p in prompts if p is not None]
        if not asked:
            return ["" for _ in conversations]
        if keys is None:
            batch = self.engine.generate(asked, self.sampling, self.policy_version)
        else:
            if len(keys) != len(conversations):
                raise ValueError(f"{len(conversations)} conversations but {len(keys)} keys")
            asked_keys = [k for k, p in zip(keys, prompts, strict=True) if p is not None]
            batch = self.engine.generate(asked, self.sampling, self.policy_version, prompt_indices=asked_keys)
        generated = batch.column("response_ids").to_pylist()
        self.counts["requests"] += len(asked)
        self.counts["calls"] += 1
        self.counts["prompt_tokens"] += sum(map(len, asked))
        self.counts["tokens"] += sum(map(len, generated))
        texts = iter(read_summary(self.template, decode_ids(self.tokenizer, g), self.max_chars) for g in generated)
        return [next(texts) if p is not None else "" for p in prompts]

    def __call__(self, dropped: list[Message]) -> str:
        return self.summarize_many([dropped])[0]


def summarize_all(summarize: Callable[[list[Message]], str], conversations: list[list[Message]],
                  keys: list[int] | None = None) -> list[str]:
    """Summaries of several conversations: one engine call for a ModelSummarizer (keys: as for `summarize_many`),
    one call each otherwise."""
    if isinstance(summarize, ModelSummarizer):
        return summarize.summarize_many(conversations, keys)
    return [summarize(c) if c else "" for c in conversations]


def summary_counts(summarize: Any) -> dict[str, int]:
    """The counters of a ModelSummarizer, zeros for any other summarize (so metric keys are always there)."""
    counts = summarize.counts if isinstance(summarize, ModelSummarizer) else {}
    return {name: counts.get(name, 0) for name in SUMMARY_COUNTERS}


def tool_results_summary(messages: list[Message], max_chars: int = 200) -> str:
    """A model-free stand-in for a summary: the latest tool results, cut to `max_chars`."""
    return " ".join(m.content for m in messages if m.role == "tool")[-max_chars:].strip()
