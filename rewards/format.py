"""Format rewards: the thinking/answer structure, and an optional over-length penalty."""

from __future__ import annotations

import re

from rewards.registry import RewardResult, pure_reward


@pure_reward
def format_reward(response: str, sample: dict, think_tag: str = "think",
                  answer_tag: str | None = None) -> RewardResult:
    """1.0 when the response is one non-empty <think>...</think> block followed by a non-empty answer.

    With `answer_tag` ("answer"), the answer must be a single <answer>...</answer> block and
    nothing else may follow the thinking. The reason names the first rule broken.
    """
    open_tag, close_tag = f"<{think_tag}>", f"</{think_tag}>"
    if response.count(open_tag) != 1 or response.count(close_tag) != 1:
        return RewardResult(0.0, f"expected exactly one {open_tag}...{close_tag} block")
    before, rest = response.split(open_tag)
    thinking, after = rest.split(close_tag)
    if before.strip():
        return RewardResult(0.0, f"text before {open_tag}")
    if not thinking.strip():
        return RewardResult(0.0, "empty thinking")
    if answer_tag is None:
        return RewardResult(1.0 if after.strip() else 0.0, "" if after.strip() else "empty answer")
    match = re.fullmatch(rf"\s*<{answer_tag}>(.*?)</{answer_tag}>\s*", after, re.DOTALL)
    if match is None or not match.group(1).strip():
        return RewardResult(0.0, f"expected one non-empty <{answer_tag}> block after the thinking")
    return RewardResult(1.0)


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """0 up to max_length - buffer, then falling linearly to -1 at max_length, -1 beyond (DAPO)."""
    if length <= max_length - buffer:
        return 0.0
    if length >= max_length:
        return -1.0
    return (max_length - buffer - length) / buffer


@pure_reward
def length_penalty_reward(response: str, sample: dict, max_length: int = 4096, buffer: int = 1024,
                          unit: str = "chars") -> float:
    """`overlong_penalty` of the response length, counted in "chars" or whitespace "words"."""
    if unit not in ("chars", "words"):
        raise ValueError(f"unit must be 'chars' or 'words', not {unit!r}")
    length = len(response) if unit == "chars" else len(response.split())
    return overlong_penalty(length, max_length, buffer)
