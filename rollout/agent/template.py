"""Chat templates: one renders a conversation for the model, the same one parses what it generated.

Two implementations share this protocol: `DeepSeekV32Template` (the V3.2 thinking-mode layout, for
real checkpoints) and `CompactTemplate` (for the tiny character tokenizer). Both apply the context
rule (`drop_stale_reasoning`) when rendering, and both parse without raising: a malformed turn is a
`ParsedTurn` whose `error` says why and whose `tool_calls` is empty, so nothing half-parsed runs.
"""

from __future__ import annotations

from typing import Any, Protocol

from rollout.agent.compact import CompactTemplate
from rollout.agent.deepseek_v32 import DeepSeekV32Template
from rollout.agent.messages import Message, ParsedTurn, drop_stale_reasoning

__all__ = ["ChatTemplate", "CompactTemplate", "DeepSeekV32Template", "drop_stale_reasoning", "get_template"]


class ChatTemplate(Protocol):
    name: str
    end_of_turn: str  # what a rendered assistant turn ends with; generation stops there
    stop_strings: tuple[str, ...]

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str: ...

    def parse(self, generated_text: str) -> ParsedTurn: ...

    def encode(self, messages: list[Message], tokenizer: Any, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]: ...


TEMPLATES: dict[str, type] = {"deepseek_v32": DeepSeekV32Template, "compact": CompactTemplate}


def get_template(name: str) -> ChatTemplate:
    """The template a config names: "deepseek_v32" or "compact"."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]()
