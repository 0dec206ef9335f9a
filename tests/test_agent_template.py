"""Chat templates: exact layouts, encoder/parser round trips, malformed turns, the reasoning rule."""

from __future__ import annotations

import random

import pytest

from rl.model.tokenizer import DEFAULT_CHARS, CharTokenizer
from rollout.agent.deepseek_v32 import BOS, DSML, EOS
from rollout.agent.messages import Message, ParsedTurn, ToolCall, drop_stale_reasoning
from rollout.agent.template import CompactTemplate, DeepSeekV32Template, get_template

SEARCH_TOOL = {"name": "search", "description": "find documents",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                              "required": ["query"]}}
PREFIX = [Message("system", "be brief."), Message("user", "in what year was the founder of zorb born?")]


def assistant(reasoning: str | None, content: str = "", *calls: ToolCall) -> Message:
    return Message("assistant", content, reasoning, list(calls))


def call(name: str, **arguments: object) -> ToolCall:
    return ToolCall(name, dict(arguments))


def generated(template, prefix: list[Message], message: Message) -> str:
    """What the model would have generated for `message`: its rendering after the prefix."""
    before = template.render(prefix)
    after = template.render([*prefix, message])
    assert after.startswith(before), "rendering a new assistant turn must only append"
    return after[len(before):]


# ---------------------------------------------------------------- exact layouts


def test_deepseek_layout_of_a_tool_use_episode():
    messages = [*PREFIX, assistant("find zorb", "", call("search", query="zorb")),
                Message("tool", "doc 1: x."), assistant("done", "answer: 1923")]
    text = DeepSeekV32Template().render(messages)
    assert text == (
        f"{BOS}be brief.<｜User｜>in what year was the founder of zorb born?<｜Assistant｜><think>"
        f"find zorb</think>\n\n<{DSML}function_calls>\n<{DSML}invoke name=\"search\">\n"
        f"<{DSML}parameter name=\"query\" string=\"true\">zorb</{DSML}parameter>\n</{DSML}invoke>\n"
        f"</{DSML}function_calls>{EOS}\n\n<function_results>\n<result>doc 1: x.</result>\n</function_results>"
        f"\n\n<think>done</think>answer: 1923{EOS}")


def test_compact_layout_of_a_tool_use_episode():
    messages = [*PREFIX, assistant("find zorb", "", call("search", query="zorb")),
                Message("tool", "doc 1: x."), assistant("done", "answer: 1923")]
    text = CompactTemplate().render(messages, tools=[SEARCH_TOOL])
    assert text == ("s:be brief. tools: search(query)|u:in what year was the founder of zorb born?|"
                    "a:<find zorb><search(query=zorb)>|t:doc 1: x.|a:<done>answer: 1923|")
    assert CharTokenizer().encode(text)[0] == CharTokenizer.bos_id


def test_generation_prompt_opens_thinking_after_user_and_after_tool_results():
    ds, compact = DeepSeekV32Template(), CompactTemplate()
    after_tool = [*PREFIX, assistant("r", "", call("search", query="a")), Message("tool", "b")]
    assert ds.render(PREFIX).endswith("<｜Assistant｜><think>")
    assert ds.render(after_tool).endswith("</function_results>\n\n<think>")
    assert compact.render(PREFIX).endswith("|a:<") and compact.render(after_tool).endswith("t:b|a:<")
    assert not ds.render(PREFIX, add_generation_prompt=False).endswith("<think>")
    assert compact.render(PREFIX, add_generation_prompt=False).endswith("born?|")


def test_deepseek_tools_prompt_lists_the_schemas_in_the_system_message():
    text = DeepSeekV32Template().render(PREFIX, tools=[SEARCH_TOOL])
    system = text[len(BOS):text.index("<｜User｜>")]
    assert system.startswith("be brief.\n\n## Tools")
    assert '"name": "search"' in system and "<functions>" in system


def test_deepseek_chat_mode_renders_no_thinking():
    template = DeepSeekV32Template(thinking=False)
    text = template.render([*PREFIX, assistant("hidden", "hi")])
    assert "hidden" not in text and "<think>" not in text
    assert template.parse("plain answer" + EOS) == ParsedTurn(None, "plain answer")


# ---------------------------------------------------------------- round trips

TURNS = [
    assistant("think first", "", call("search", query="zorb founded")),
    assistant("two at once", "let me look.", call("search", query="kelm born"),
              call("search", query="vask land")),
    assistant("", "answer: 1923"),
    assistant("numbers", "", call("flights", origin="vask", dest="mord", day=3)),
    assistant("no args", "", call("tests")),
    assistant("code", "", call("run", code="def f(x, y): return max(x, y)*2-1")),
]


@pytest.mark.parametrize("template", [DeepSeekV32Template(), CompactTemplate()], ids=["deepseek", "compact"])
@pytest.mark.parametrize("message", TURNS, ids=[str(i) for i in range(len(TURNS))])
def test_render_then_parse_gives_back_the_turn(template, message):
    text = generated(template, PREFIX, message)
    assert text.endswith(template.end_of_turn)
    parsed = template.parse(text)
    assert parsed.ok, parsed.error
    assert parsed.to_message() == message
    # vLLM strips the stop string from the text: the parse must not depend on it.
    assert template.parse(text.removesuffix(template.end_of_turn)) == parsed


@pytest.mark.parametrize("template", [DeepSeekV32Template(), CompactTemplate()], ids=["deepseek", "compact"])
def test_multi_turn_rollout_only_appends_between_user_messages(template):
    """prompt + generated + tool results + generated ... equals the rendering of the conversation."""
    conversation = list(PREFIX)
    stream = template.render(conversation)
    steps = [(TURNS[1], ["doc 1: a.", "doc 2: b."]), (TURNS[0], ["doc 3: c."]), (TURNS[2], [])]
    for message, results in steps:
        text = generated(template, conversation, message)
        conversation.append(template.parse(text).to_message())
        stream += text
        assert template.render(conversation, add_generation_prompt=False) == stream
        conversation += [Message("tool", r) for r in results]
        if results:
            rendered = template.render(conversation)
            assert rendered.startswith(stream)
            stream = rendered
    assert reasonings(conversation) == ["two at once", "think first", ""]


def test_deepseek_non_string_arguments_are_json():
    message = assistant("r", "", call("plan", days=[1, 2], strict=True, budget=900, where={"city": "vask"}))
    text = generated(DeepSeekV32Template(), PREFIX, message)
    assert f'<{DSML}parameter name="days" string="false">[1, 2]</{DSML}parameter>' in text
    assert DeepSeekV32Template().parse(text).tool_calls == message.tool_calls


def test_compact_integers_and_strings():
    parsed = CompactTemplate().parse("r><flights(origin=vask, dest=007, day=12, shift=-3)>|")
    assert parsed.tool_calls == [call("flights", origin="vask", dest="007", day=12, shift=-3)]


def test_compact_render_refuses_what_it_cannot_write():
    compact = CompactTemplate()
    for bad in ([Message("user", "a|b")], [Message("user", "Capital")], [assistant("a<b", "x")],
                [assistant("r", "", call("search", query="x, y=1"))], [assistant("r", "", call("my_tool"))],
                [assistant("r", "", call("search", query=1.5))]):
        with pytest.raises(ValueError):
            compact.render(bad)


def test_get_template():
    assert isinstance(get_template("compact"), CompactTemplate)
    assert isinstance(get_template("deepseek_v32"), DeepSeekV32Template)
    with pytest.raises(ValueError):
        get_template("chatml")


# ---------------------------------------------------------------- malformed turns


def param(name: str, string: str, value: str) -> str:
    return f'<{DSML}parameter name="{name}" string="{string}">{value}</{DSML}parameter>'


def invoke(name: str, *body: str) -> str:
    return f'<{DSML}invoke name="{name}">\n' + "\n".join(body) + f"\n</{DSML}invoke>"


def block(*inner: str) -> str:
    return f"<{DSML}function_calls>\n" + "\n".join(inner) + f"\n</{DSML}function_calls>"


DEEPSEEK_BROKEN = [
    "reasoning that never ends",
    f"r</think>x\n\n<{DSML}function_calls>\n" + invoke("search"),  # block never closed
    f"r</think><{DSML}function_calls>\n<{DSML}invoke name=\"search\">\n</{DSML}function_calls>",
    "r</think>" + block(invoke("")),
    "r</think>" + block(invoke("s", param("q", "maybe", "x"))),
    "r</think>" + block(invoke("s", param("q", "false", "{oops"))),
    "r</think>" + block(invoke("s", param("q", "true", "a"), param("q", "true", "b"))),
    "r</think>" + block(invoke("s")) + "and more",
    "r</think>hi " + invoke("s"),
    "r</think>" + block(),
    "r</think>" + block("stray", invoke("s")),
    "r</think>" + block(invoke("s", "loose text")),
    "r</think>x " + param("q", "true", "y"),
]

COMPACT_BROKEN = [
    "no closing bracket at all",
    "a<b>c|",
    "r>content > more|",
    "r><search(query=x)|",
    "r><search query=x>|",
    "r><search(query)>|",
    "r><search(query=1, query=2)>|",
    "r><search(query=x)> trailing|",
    "r><Search(query=x)>|",
    "r><(query=x)>|",
    "r><search(=x)>|",
    "r><search(query=x)>x<search(query=y)>|",
    "r><>|",
    "r><search(query=nu baser:<sebad)>|",  # generated by a tiny model: a value that cannot be rendered back
]


@pytest.mark.parametrize("text", DEEPSEEK_BROKEN)
def test_deepseek_malformed_turns_are_errors_not_exceptions(text):
    parsed = DeepSeekV32Template().parse(text)
    assert parsed.error and parsed.tool_calls == []


@pytest.mark.parametrize("text", COMPACT_BROKEN)
def test_compact_malformed_turns_are_errors_not_exceptions(text):
    parsed = CompactTemplate().parse(text)
    assert parsed.error and parsed.tool_calls == []


def test_random_text_never_raises_and_clean_parses_are_stable():
    """Fuzz both parsers; whatever parses cleanly renders and parses back to the same turn."""
    rng = random.Random(0)
    pieces = {
        "compact": [*DEFAULT_CHARS, "<", ">", "(", ")", "=", ", ", "|", "<search(", "query=", ")>", "query=a<"],
        "deepseek": ["x", " ", "\n", "</think>", f"<{DSML}function_calls>", f"</{DSML}function_calls>",
                     f'<{DSML}invoke name="s">', f"</{DSML}invoke>",
                     f'<{DSML}parameter name="q" string="true">',
                     f'<{DSML}parameter name="n" string="false">', "7", f"</{DSML}parameter>", EOS],
    }
    templates = {"compact": CompactTemplate(), "deepseek": DeepSeekV32Template()}
    clean = 0
    for name, template in templates.items():
        for _ in range(400):
            text = "".join(rng.choice(pieces[name]) for _ in range(rng.randint(0, 20)))
            parsed = template.parse(text)
            if parsed.ok:
                again = template.parse(generated(template, PREFIX, parsed.to_message()))
                assert again == parsed
                clean += 1
    assert clean > 20  # the fuzz reached well-formed turns, not only errors


# ---------------------------------------------------------------- the reasoning rule

CONVERSATION = [
    Message("system", "be brief."),
    Message("user", "first task"),
    assistant("r1", "", call("search", query="a")),
    Message("tool", "result a"),
    assistant("r2", "", call("search", query="b")),
    Message("tool", "result b"),
    assistant("r3", "answer: 1"),
    Message("user", "second task"),
    assistant("r4", "", call("search", query="c")),
    Message("tool", "result c"),
]


def reasonings(messages: list[Message]) -> list[str | None]:
    return [m.reasoning_content for m in messages if m.role == "assistant"]


def test_tool_results_keep_reasoning():
    first_task = CONVERSATION[:6]
    assert reasonings(drop_stale_reasoning(first_task)) == ["r1", "r2"]


def test_new_user_message_drops_earlier_reasoning():
    assert reasonings(drop_stale_reasoning(CONVERSATION)) == [None, None, None, "r4"]
    assert reasonings(CONVERSATION) == ["r1", "r2", "r3", "r4"]  # the input is left alone


def test_final_answer_reasoning_survives_until_the_next_user_message():
    assert reasonings(drop_stale_reasoning(CONVERSATION[:7])) == ["r1", "r2", "r3"]
    assert reasonings(drop_stale_reasoning(CONVERSATION[:8])) == [None, None, None]


def test_no_user_message_drops_nothing():
    messages = [Message("system", "s"), assistant("r0", "hi")]
    assert drop_stale_reasoning(messages) == messages


@pytest.mark.parametrize("template", [DeepSeekV32Template(), CompactTemplate()], ids=["deepseek", "compact"])
def test_templates_render_only_the_surviving_reasoning(template):
    text = template.render(CONVERSATION)
    assert "r4" in text and not any(r in text for r in ("r1", "r2", "r3"))
    text = template.render(CONVERSATION[:6])
    assert "r1" in text and "r2" in text


def test_messages_reject_misplaced_fields():
    with pytest.raises(ValueError):
        Message("user", "x", reasoning_content="r")
    with pytest.raises(ValueError):
        Message("tool", "x", tool_calls=[call("search")])
    with pytest.raises(ValueError):
        Message("developer", "x")
