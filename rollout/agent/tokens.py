"""Token-level helpers of the agent loop, its summaries and its demonstrations: text to ids and back with keel's
character tokenizer or a Hugging Face one, the stop tokens of a template, the sampling of one turn, the budget.
"""

from __future__ import annotations

from typing import Any

from rl.model.tokenizer import Tokenizer
from rollout.agent.template import ChatTemplate


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a piece of text, nothing added (keel's Tokenizer or a Hugging Face tokenizer)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, bos=False)
    return tokenizer.encode(text, add_special_tokens=False)


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """Text of generated ids with special tokens kept, so a template can see its end-of-turn token."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.decode(ids)
    return tokenizer.decode(ids, skip_special_tokens=False)


def stop_token_ids(template: ChatTemplate, tokenizer: Any) -> list[int]:
    """The ids generation stops at: each stop string of the template (one token each) and EOS."""
    ids = []
    for text in template.stop_strings:
        encoded = encode_text(tokenizer, text)
        if len(encoded) != 1:
            raise ValueError(f"stop string {text!r} is {len(encoded)} tokens; the loop needs single-token stops")
        ids.append(encoded[0])
    eos = getattr(tokenizer, "eos_id", getattr(tokenizer, "eos_token_id", None))
    return sorted(set(ids) | ({eos} if eos is not None else set()))


def turn_sampling(sampling: dict, template: ChatTemplate, tokenizer: Any) -> dict:
    """`sampling` for one assistant turn per request: n=1, stopping at the template's end of turn and EOS."""
    stops = set(sampling.get("stop_token_ids", ())) | set(stop_token_ids(template, tokenizer))
    return {**sampling, "n": 1, "stop_token_ids": sorted(stops)}


def fits(length: int, max_tokens: int, max_total_tokens: int) -> bool:
    """Whether a prompt of `length` tokens leaves room for a full turn within the budget."""
    return length + max_tokens <= max_total_tokens
