"""The DeepSeek-V3.2 thinking-mode conversation layout, for real checkpoints.

Layout (thinking mode), one string, as DeepSeek's own encoder for V3.2 lays it out:

    <｜begin▁of▁sentence｜>{system}[\\n\\n{tools prompt}]
    <｜User｜>{user}<｜Assistant｜><think>                 (the last user message opens thinking)
    {reasoning}</think>{content}[\\n\\n{function_calls block}]<｜end▁of▁sentence｜>
    \\n\\n<function_results>\\n<result>{tool}</result>...\\n</function_results>\\n\\n<think>
    {reasoning}</think>{content}<｜end▁of▁sentence｜>

(shown on several lines here; there are no line breaks between the pieces.) A user message that is
not the last one, and tool results before the last user message, are followed by `</think>`
instead of `<think>`, and the assistant turns they lead to are rendered without reasoning: that is
the context rule of `messages.drop_stale_reasoning`. Tool calls are a DSML block:

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="search">
    <｜DSML｜parameter name="q" string="true">zorb</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

String values are written as is with string="true"; other values as JSON with string="false".

Uncertain: the special tokens, the DSML tags, the tool-result wrapping and the transitions follow
the `encoding/encoding_dsv32.py` shipped with the DeepSeek-V3.2 checkpoint (as vendored by
inference engines). The wording of the tools prompt below is ours, not DeepSeek's; for evaluating a
real checkpoint pass the official wording as `tools_prompt` (placeholder `{tool_schemas}`).
The "developer" role and response_format of the official encoder are not supported.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rollout.agent.messages import Message, ParsedTurn, ToolCall, drop_stale_reasoning, last_user_index

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
CALLS_START = f"<{DSML}function_calls>"
CALLS_END = f"</{DSML}function_calls>"
RESULTS_START = "<function_results>"
RESULTS_END = "</function_results>"

DEFAULT_TOOLS_PROMPT = f"""## Tools

You can use the tools below to answer the user's question. To call tools, write a \
"{CALLS_START}" block like this one in your reply:
{CALLS_START}
<{DSML}invoke name="$FUNCTION_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
</{DSML}function_calls>

Write string parameters as they are, without quotes or escaping, with string="true"; write \
numbers, booleans, lists and objects as JSON with string="false".

In thinking mode, after {RESULTS_START}...{RESULTS_END} think again inside \
{THINK_START}...{THINK_END} before calling more tools or answering.

The functions, in JSONSchema format:
<functions>
{{tool_schemas}}
</functions>
"""

_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*?)</{DSML}invoke>', re.DOTALL)
_PARAMETER = re.compile(rf'<{DSML}parameter name="([^"]*)" string="([^"]*)">(.*?)</{DSML}parameter>',
                        re.DOTALL)


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _render_tool_call(call: ToolCall) -> str:
    parameters = "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else _to_json(value)}</{DSML}parameter>"
        for key, value in call.arguments.items()
    )
    return f'<{DSML}invoke name="{call.name}">\n{parameters}\n</{DSML}invoke>'


def _parse_invoke(name: str, body: str) -> tuple[ToolCall, str | None]:
    """One tool call from an invoke's name and body; the error says what was malformed."""
    if not name:
        return ToolCall(name, {}), "invoke without a tool name"
    arguments: dict[str, Any] = {}
    for key, is_string, raw in _PARAMETER.findall(body):
        if key in arguments:
            return ToolCall(name, arguments), f"parameter {key!r} given twice in call to {name!r}"
        if is_string == "true":
            arguments[key] = raw
        elif is_string == "false":
            try:
                arguments[key] = json.loads(raw)
            except json.JSONDecodeError:
                return ToolCall(name, arguments), f"parameter {key!r} of {name!r} is not valid JSON: {raw!r}"
        else:
            return ToolCall(name, arguments), f'parameter {key!r} has string="{is_string}", not true/false'
    if _PARAMETER.sub("", body).strip():
        return ToolCall(name, arguments), f"unexpected text inside the call to {name!r}"
    return ToolCall(name, arguments), None


def _parse_calls_block(block: str) -> tuple[list[ToolCall], str | None]:
    """Tool calls from the text between the function_calls tags."""
    calls = []
    for name, body in _INVOKE.findall(block):
        call, error = _parse_invoke(name, body)
        calls.append(call)
        if error:
            return calls, error
    if _INVOKE.sub("", block).strip():
        return calls, "unexpected text inside the function_calls block (an unclosed invoke?)"
    if not calls:
        return calls, "empty function_calls block"
    return calls, None


class DeepSeekV32Template:
    """Renders conversations in the V3.2 layout and parses generated V3.2 turns.

    `render(messages + [parse(g).to_message()]) == render(messages) + g` for a turn g that ends
    with the end-of-sentence token, so a multi-turn rollout between user messages only ever
    appends tokens (the property the token-level loop relies on).
    """

    name = "deepseek_v32"
    end_of_turn = EOS
    stop_strings: tuple[str, ...] = (EOS,)

    def __init__(self, thinking: bool = True, tools_prompt: str = DEFAULT_TOOLS_PROMPT):
        self.thinking = thinking
        self.tools_prompt = tools_prompt

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The prompt text; the generation prompt opens the next assistant turn (and its thinking)."""
        messages = drop_stale_reasoning(messages)
        last_user = last_user_index(messages)
        out = [BOS]
        if tools and (not messages or messages[0].role != "system"):
            out.append(self._tools_text(tools))
        for i, message in enumerate(messages):
            is_last = i == len(messages) - 1
            opens_turn = not is_last or add_generation_prompt
            # Thinking reopens only after the last user message; earlier turns get an empty `</think>`.
            think = THINK_START if self.thinking and i >= last_user else THINK_END
            if message.role == "system":
                out.append(message.content)
                if tools and i == 0:
                    out.append(("\n\n" if message.content else "") + self._tools_text(tools))
            elif message.role == "user":
                out.append(f"{USER}{message.content}")
                if opens_turn:
                    out.append(ASSISTANT + think)
            elif message.role == "assistant":
                reasoning = ""
                if self.thinking and i > last_user:
                    reasoning = f"{message.reasoning_content or ''}{THINK_END}"
                calls = ""
                if message.tool_calls:
                    rendered = "\n".join(_render_tool_call(c) for c in message.tool_calls)
                    calls = f"\n\n{CALLS_START}\n{rendered}\n{CALLS_END}"
                out.append(f"{reasoning}{message.content}{calls}{EOS}")
            else:  # tool: consecutive results share one function_results block
                if i == 0 or messages[i - 1].role != "tool":
                    out.append(f"\n\n{RESULTS_START}")
                out.append(f"\n<result>{message.content}</result>")
                if is_last or messages[i + 1].role != "tool":
                    out.append(f"\n{RESULTS_END}")
                    if opens_turn:
                        out.append(f"\n\n{think}")
        return "".join(out)

    def parse(self, generated_text: str) -> ParsedTurn:
        """Reasoning, content and tool calls of one generated turn (with or without the EOS)."""
        text = generated_text.split(EOS, 1)[0]
        reasoning = None
        if self.thinking:
            if THINK_END not in text:
                return ParsedTurn(text, "", [], "reasoning was not closed with </think>")
            reasoning, text = text.split(THINK_END, 1)
        start = text.find(CALLS_START)
        if start < 0:
            if DSML in text:
                return ParsedTurn(reasoning, text, [], "DSML tag outside a function_calls block")
            return ParsedTurn(reasoning, text)
        content = text[:start].removesuffix("\n\n")
        end = text.find(CALLS_END, start)
        if end < 0:
            return ParsedTurn(reasoning, content, [], "function_calls block was not closed")
        if DSML in content:
            return ParsedTurn(reasoning, content, [], "DSML tag outside a function_calls block")
        if text[end + len(CALLS_END):].strip():
            return ParsedTurn(reasoning, content, [], "text after the function_calls block")
        calls, error = _parse_calls_block(text[start + len(CALLS_START):end])
        return ParsedTurn(reasoning, content, calls if error is None else [], error)

    def encode(self, messages: list[Message], tokenizer: Any, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of `render(...)` with a Hugging Face tokenizer; BOS is already in the text."""
        return tokenizer.encode(self.render(messages, add_generation_prompt, tools), add_special_tokens=False)

    def _tools_text(self, tools: list[dict]) -> str:
        return self.tools_prompt.replace("{tool_schemas}", "\n".join(_to_json(t) for t in tools))
