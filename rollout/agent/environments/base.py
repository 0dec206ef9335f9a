"""What every environment is: a task, tools with JSON-schema arguments, hidden state, a verifier.

An environment is made from a seed and is deterministic given it. The model sees `task` and
`tools`; it acts through `call`, which never raises for anything the model did (an unknown tool,
bad arguments, a refused request): it answers with an "error: ..." string instead, because a tool
error is an observation the model should learn from, not a crash of the loop. `verify` scores the
final answer, 1.0 or 0.0; the loop calls it through `score`.

A tool or verifier that crashes or hangs (an environment's own bug) never stalls a step: `call` answers
"error: ..." and `score` gives 0 with the reason, each after at most `time_limit_s`. A hung function is left
running in its daemon thread (Python cannot stop a thread); its environment is not used again.

Every string an environment shows the model is "plain": lowercase, digits and the punctuation of
the compact alphabet without its delimiters `< > |`, so the tiny character model can read it.
"""

from __future__ import annotations

import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from rl.model.tokenizer import DEFAULT_CHARS

PLAIN_CHARS = frozenset(DEFAULT_CHARS) - set("<>|")
_INTEGER = re.compile(r"-?\d+")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


class ToolError(Exception):
    """A tool refused its request; the message goes back to the model as the tool's result."""


def bounded(fn: Callable[[], Any], time_limit_s: float) -> Any:
    """fn() run in a daemon thread: its result, its exception, or TimeoutError after time_limit_s."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = error

    thread = threading.Thread(target=run, name="keel-env-call", daemon=True)
    thread.start()
    thread.join(time_limit_s)
    if thread.is_alive():
        raise TimeoutError(f"did not return within {time_limit_s:g} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def plain(text: str) -> str:
    """Lowercase `text` with characters the compact layout cannot show replaced by spaces."""
    return "".join(c if c in PLAIN_CHARS else " " for c in text.lower())


def tool_schema(name: str, description: str, **parameters: tuple[str, str]) -> dict:
    """A tool in JSON-schema style; each parameter is (type, description) and required."""
    properties = {key: {"type": kind, "description": text} for key, (kind, text) in parameters.items()}
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(parameters)}}


def check_arguments(tool: dict, arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments coerced to the schema's types ("string", "integer"); ToolError if they do not fit.

    Integers spelled as strings and strings that parsed as integers are converted, because the
    compact layout cannot tell "7" from 7.
    """
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments of {tool['name']} must be key=value pairs")
    schema = tool["parameters"]
    properties = schema.get("properties", {})
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        expected = ", ".join(properties) or "none"
        raise ToolError(f"{tool['name']} has no argument {plain(unknown[0])}. its arguments: {expected}")
    missing = [k for k in schema.get("required", []) if k not in arguments]
    if missing:
        raise ToolError(f"{tool['name']} needs the argument {missing[0]}")
    checked = {}
    for key, value in arguments.items():
        kind = properties[key].get("type", "string")
        if kind == "integer":
            if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ToolError(f"argument {key} of {tool['name']} must be a whole number")
        elif kind == "string":
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise ToolError(f"argument {key} of {tool['name']} must be text")
        checked[key] = value
    return checked


def final_answer_text(answer: str) -> str:
    """The part of a final message that is the answer: after the last "answer:", else all of it."""
    lowered = answer.lower()
    at = lowered.rfind("answer:")
    return (answer[at + len("answer:"):] if at >= 0 else answer).strip()


def make_names(rng: random.Random, n: int, taken: set[str] | None = None, length: int | None = None) -> list[str]:
    """`n` distinct made-up words like "zorb" or "kelava" (none in `taken`, which is updated), all of
    `length` characters if given."""
    taken = set() if taken is None else taken
    names = []
    while len(names) < n:
        syllables = [rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3))]
        word = "".join(syllables) + (rng.choice(_CONSONANTS) if rng.random() < 0.6 else "")
        if len(word) >= 3 and word not in taken and length in (None, len(word)):
            taken.add(word)
            names.append(word)
    return names


DIFFICULTIES = (1, 2, 3)


def check_difficulty(kind: str, difficulty: int) -> None:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"{kind} environments have difficulty 1, 2 or 3, not {difficulty!r}")


class Environment(ABC):
    """Base class: subclasses set `kind`, build `task`/`tools`/hidden state from (seed, difficulty),
    and implement the tools (`handlers`) and `verify`. `tool_calls` and `tool_errors` count calls for metrics."""

    kind: str = ""
    time_limit_s: float = 10.0  # per tool call and per verification
    # Stands in for a remote tool's latency (benchmarks and tests of the agent schedule; the synthesized tools answer
    # at once): each call first waits tool_latency() seconds, drawn per call. Counts against time_limit_s.
    tool_latency: Callable[[], float] | None = None

    def __init__(self, seed: int, task: str, tools: list[dict], difficulty: int = 2):
        self.seed = seed
        self.difficulty = difficulty
        self.task = task
        self.tools = tools
        self.tool_calls = 0
        self.tool_errors = 0

    @abstractmethod
    def handlers(self) -> dict[str, Callable[..., str]]:
        """Tool name -> function taking the checked arguments as keywords and returning the result."""

    @abstractmethod
    def verify(self, final_answer: str) -> float:
        """1.0 when the final answer solves the task, else 0.0."""

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Run one tool call; errors come back as "error: ..." text, never as exceptions."""
        self.tool_calls += 1
        tool = next((t for t in self.tools if t["name"] == name), None)
        try:
            if tool is None:
                names = ", ".join(t["name"] for t in self.tools)
                raise ToolError(f"there is no tool {plain(name)}. tools: {names}")
            checked = check_arguments(tool, arguments)
            result = bounded(lambda: self._run(name, checked), self.time_limit_s)
        except ToolError as error:
            self.tool_errors += 1
            return plain(f"error: {error}")
        except Exception as error:  # the tool's own bug or hang: the episode goes on, the model sees an error
            self.tool_errors += 1
            return plain(f"error: tool {name} failed: {type(error).__name__}: {error}")
        return plain(result)

    def _run(self, name: str, checked: dict[str, Any]) -> str:
        if self.tool_latency is not None:
            time.sleep(self.tool_latency())
        return self.handlers()[name](**checked)

    def score(self, final_answer: str) -> tuple[float, str]:
        """(verify's reward, "") or, when verify crashes or hangs, (0.0, the reason)."""
        try:
            return float(bounded(lambda: self.verify(final_answer), self.time_limit_s)), ""
        except Exception as error:
            return 0.0, f"verifier failed: {type(error).__name__}: {error}"
