"""A compact conversation layout that the tiny character tokenizer can spell.

The alphabet has digits, lowercase letters and `+-*/=()<>?:., |`: no newlines, quotes or braces.
Each message is a one-letter role, a colon, its text and a `|` that ends it:

    s:find facts. tools: search(query)|u:in what year was the founder of zorb born?|
    a:<zorb was founded by someone>let me look.<search(query=zorb founded)>|t:doc 3: ...|
    a:<kelm founded zorb. now his year>answer: 1923|

(shown on three lines; there are none.) An assistant turn always opens a `<...>` thinking block,
which is empty (`a:<>`) when the context rule has dropped its reasoning; then its content; then its
tool calls, each `<name(key=value, key=value)>`. The generation prompt is `a:<`, so the model
writes `reasoning>content<calls>|` and stops at `|`. Like the V3.2 layout, a turn opens only
after a user message or tool results.

What cannot be written, so render refuses it and parse reports it: `|` inside any message;
`<` or `>` in assistant reasoning, content or argument values; a string value that contains
", key=" (it would split into two arguments). Argument values are strings or integers; a value
spelled as an integer (`7`, `-3`, not `007`) parses as an integer.
"""

from __future__ import annotations

import re
from typing import Any

from rl.model.tokenizer import DEFAULT_CHARS
from rollout.agent.messages import Message, ParsedTurn, ToolCall, drop_stale_reasoning

END = "|"
PREFIX = {"system": "s:", "user": "u:", "assistant": "a:", "tool": "t:"}
GENERATION_PROMPT = "a:<"

_NAME = re.compile(r"[a-z][a-z0-9]*")
_CALL = re.compile(r"([a-z][a-z0-9]*)\((.*)\)", re.DOTALL)
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
# A comma, a space and `key=` start the next argument; anything else belongs to the value.
_NEXT_ARGUMENT = re.compile(r", (?=[a-z][a-z0-9]*=)")


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"compact tool arguments are strings or integers, not {value!r}")
    text = str(value)
    if any(c in text for c in "<>|") or _NEXT_ARGUMENT.search(text):
        raise ValueError(f"compact argument value {text!r} contains <, >, | or ', key='")
    return text


def _render_call(call: ToolCall) -> str:
    for key in (call.name, *call.arguments):
        if not _NAME.fullmatch(key):
            raise ValueError(f"compact tool and argument names are [a-z][a-z0-9]*, not {key!r}")
    arguments = ", ".join(f"{k}={_format_value(v)}" for k, v in call.arguments.items())
    return f"<{call.name}({arguments})>"


def _parse_value(text: str) -> int | str:
    return int(text) if _INTEGER.fullmatch(text) else text


def _parse_call(inner: str) -> tuple[ToolCall | None, str | None]:
    """One call from the text between `<` and `>`."""
    match = _CALL.fullmatch(inner)
    if not match:
        return None, f"tool call {inner!r} does not look like name(key=value, ...)"
    name, argument_text = match.groups()
    arguments: dict[str, int | str] = {}
    for piece in _NEXT_ARGUMENT.split(argument_text) if argument_text else []:
        key, eq, value = piece.partition("=")
        if not eq or not _NAME.fullmatch(key):
            return None, f"argument {piece!r} of {name!r} is not key=value"
        if key in arguments:
            return None, f"argument {key!r} given twice in call to {name!r}"
        if "<" in value:  # the layout could not render it back (a generated `<a(k=x<y)>`)
            return None, f"argument {key!r} of {name!r} contains <"
        arguments[key] = _parse_value(value)
    return ToolCall(name, arguments), None


def _parse_calls(text: str) -> tuple[list[ToolCall], str | None]:
    """Calls from the text after the content: `<call>` tags, optionally separated by spaces."""
    calls = []
    rest = text.lstrip(" ")
    while rest:
        if not rest.startswith("<"):
            return [], f"text {rest!r} after a tool call"
        close = rest.find(">")
        if close < 0:
            return [], "tool call was not closed with >"
        call, error = _parse_call(rest[1:close])
        if error:
            return [], error
        calls.append(call)
        rest = rest[close + 1:].lstrip(" ")
    return calls, None


class CompactTemplate:
    """Renders and parses the compact layout; see the module docstring for the grammar.

    `render(messages + [parse(g).to_message()]) == render(messages) + g` for a well-formed turn g
    that ends with `|`, so between user messages a rollout only appends characters.
    """

    name = "compact"
    end_of_turn = END
    stop_strings: tuple[str, ...] = (END,)

    def __init__(self, alphabet: str = DEFAULT_CHARS):
        self.alphabet = set(alphabet)

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The prompt text; raises ValueError for text the layout or the alphabet cannot hold."""
        messages = drop_stale_reasoning(messages)
        out = []
        if tools and (not messages or messages[0].role != "system"):
            out.append(f"{PREFIX['system']}{self._tools_text(tools)}{END}")
        for i, message in enumerate(messages):
            body = message.content
            if message.role == "system" and tools and i == 0:
                body = f"{body} {self._tools_text(tools)}" if body else self._tools_text(tools)
            if message.role == "assistant":
                for part in (message.reasoning_content or "", message.content):
                    if "<" in part or ">" in part:
                        raise ValueError(f"assistant text {part!r} contains < or >, which delimit tags")
                calls = "".join(_render_call(c) for c in message.tool_calls)
                body = f"<{message.reasoning_content or ''}>{message.content}{calls}"
            if END in message.content:
                raise ValueError(f"message {i} contains {END!r}, which ends a message")
            out.append(f"{PREFIX[message.role]}{body}{END}")
        # As in the V3.2 layout, a new assistant turn opens after a user message or tool results.
        if add_generation_prompt and messages and messages[-1].role in ("user", "tool"):
            out.append(GENERATION_PROMPT)
        text = "".join(out)
        unknown = sorted(set(text) - self.alphabet)
        if unknown:
            raise ValueError(f"characters {unknown!r} are outside the compact alphabet")
        return text

    def parse(self, generated_text: str) -> ParsedTurn:
        """Reasoning, content and tool calls of `reasoning>content<calls>|` (the `|` is optional)."""
        text = generated_text.split(END, 1)[0]
        if ">" not in text:
            return ParsedTurn(text, "", [], "reasoning was not closed with >")
        reasoning, rest = text.split(">", 1)
        if "<" in reasoning:
            return ParsedTurn(reasoning, rest, [], "< inside the reasoning")
        start = rest.find("<")
        content = rest if start < 0 else rest[:start]
        if ">" in content:
            return ParsedTurn(reasoning, content, [], "> in the content without an opening <")
        calls, error = _parse_calls(rest[len(content):])
        return ParsedTurn(reasoning, content, calls, error)

    def encode(self, messages: list[Message], tokenizer: Any, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of `render(...)` with the character tokenizer, BOS first."""
        return tokenizer.encode(self.render(messages, add_generation_prompt, tools), bos=True)

    @staticmethod
    def _tools_text(tools: list[dict]) -> str:
        """`tools: name(param, param), ...`: names and parameters, the part a tiny model needs."""
        signatures = []
        for tool in tools:
            parameters = ", ".join(tool.get("parameters", {}).get("properties", {}))
            signatures.append(f"{tool['name']}({parameters})")
        return "tools: " + ", ".join(signatures)
