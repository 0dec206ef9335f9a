"""Conversation messages, tool calls, parsed model turns, and the rule for stale reasoning.

A conversation is a list of `Message`s with roles system / user / assistant / tool. An assistant
message may carry `reasoning_content` (its thinking) and `tool_calls`; each tool message holds
the result of one call, in the order the calls were made.

The reasoning rule (DeepSeek-V3.2, "thinking in tool-use"): earlier reasoning is dropped from the
context only when a new user message arrives. Tool results appended after an assistant turn do not
drop anything, so the model keeps building on its own thoughts across tool calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One call of a named tool; `arguments` maps parameter names to decoded values."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """One message. `tool_call_id` and `name` identify the call a tool message answers."""

    role: Role
    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if self.role != "assistant" and (self.reasoning_content is not None or self.tool_calls):
            raise ValueError(f"only assistant messages carry reasoning or tool calls, not {self.role!r}")


@dataclass(frozen=True)
class ParsedTurn:
    """What a template read out of one generated assistant turn.

    `error` is None for a well-formed turn. For a malformed one it says what was wrong, reasoning
    and content hold what could be read, and `tool_calls` is empty so nothing half-parsed runs;
    the loop ends or penalises the episode without catching exceptions.
    """

    reasoning: str | None
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_message(self) -> Message:
        """The assistant message to append to the conversation for this turn."""
        return Message("assistant", self.content, self.reasoning, list(self.tool_calls))


def last_user_index(messages: list[Message]) -> int:
    """Index of the last user message, or -1 when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            return i
    return -1


def drop_stale_reasoning(messages: list[Message]) -> list[Message]:
    """The context rule: remove the reasoning of assistant turns before the last user message.

    Assistant turns after the last user message keep their reasoning, however many tool results
    follow them. Returns a new list; the input is not modified.
    """
    cut = last_user_index(messages)
    return [
        dataclasses.replace(m, reasoning_content=None)
        if i < cut and m.role == "assistant" and m.reasoning_content is not None
        else m
        for i, m in enumerate(messages)
    ]
