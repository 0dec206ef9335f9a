"""A code-fixing task: a one-line Python function with one bug, tests run in the sandbox.

The hidden function is `def f(x, y): return <expression>` over x, y, small constants, + - *, max
and min, nested up to `difficulty` (1 to 3) levels deep; the shown one has one mutation (an
operator, a constant, a variable or max/min swapped) that changes its result on a visible test.
Tools: `tests` lists the visible cases, `run` checks a candidate against them. The answer is the
fixed line; verify runs it on the hidden cases (a superset of the visible ones), so a fix fitted to
the visible cases alone can still fail.

Candidate code comes from the model, so it only ever runs in `rewards.sandbox.run_in_sandbox`. The
expected values stay on this side: the sandbox reports what f returned, and we compare.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections.abc import Callable

from rewards.sandbox import MIB, SandboxLimits, run_in_sandbox
from rollout.agent.environments.base import Environment, ToolError, check_difficulty, final_answer_text, tool_schema

VISIBLE_CASES, HIDDEN_CASES = 3, 8
LIMITS = SandboxLimits(wall_time_s=2.0, memory_bytes=256 * MIB)
HEADER = "def f(x, y): return "
MUTATIONS = {"+": ["-", "*"], "-": ["+"], "*": ["+"], "x": ["y"], "y": ["x"], "max": ["min"], "min": ["max"]}

# Runs inside the sandbox: define f from the candidate, call it on each input, print the results
# after a per-run marker so that anything the candidate prints itself is not mistaken for them.
HARNESS = """
import json, sys
data = json.loads(sys.stdin.read())
namespace = {}
try:
    exec(data["code"], namespace)
    f = namespace["f"]
except BaseException as error:
    print(data["mark"] + json.dumps({"error": type(error).__name__}))
    raise SystemExit(0)
results = []
for args in data["inputs"]:
    try:
        results.append(f(*args))
    except BaseException as error:
        results.append({"error": type(error).__name__})
print(data["mark"] + json.dumps(results, default=repr))
"""


def _expression(rng: random.Random, depth: int) -> tuple[list[str], bool]:
    """Tokens of a random expression over x, y and constants 1-9, and whether it is atomic (a
    name, a constant or a max/min call), i.e. safe as an operand without parentheses."""
    if depth == 0 or rng.random() < 0.2:
        return [rng.choice(["x", "y", str(rng.randint(1, 9))])], True
    (left, left_atomic), (right, right_atomic) = _expression(rng, depth - 1), _expression(rng, depth - 1)
    if rng.random() < 0.3:
        return [rng.choice(["max", "min"]), "(", *left, ",", *right, ")"], True
    left = left if left_atomic else ["(", *left, ")"]
    right = right if right_atomic else ["(", *right, ")"]
    return [*left, rng.choice("+-*"), *right], False


def _code(tokens: list[str]) -> str:
    return HEADER + "".join(", " if t == "," else t for t in tokens)


def _evaluate(tokens: list[str], inputs: list[tuple[int, int]]) -> list[int]:
    # Our own generated expression, never the model's: safe to evaluate here.
    function = eval(f"lambda x, y: {_code(tokens)[len(HEADER):]}")
    return [function(x, y) for x, y in inputs]


def _mutate(rng: random.Random, tokens: list[str]) -> list[str]:
    """The tokens with one operator, constant, variable or max/min changed."""
    spots = [i for i, t in enumerate(tokens) if t in MUTATIONS or t.isdigit()]
    i = rng.choice(spots)
    old = tokens[i]
    new = str(rng.choice([d for d in range(1, 10) if abs(d - int(old)) == 1])) if old.isdigit() \
        else rng.choice(MUTATIONS[old])
    return [*tokens[:i], new, *tokens[i + 1:]]


def extract_code(answer: str) -> str:
    """The code in a final answer: the last fenced block if there is one, else the answer text."""
    text = final_answer_text(answer)
    blocks = re.findall(r"```(?:python)?\n?(.*?)```", text, re.DOTALL)
    return (blocks[-1] if blocks else text).strip()


def run_cases(code: str, inputs: list[tuple[int, int]]) -> list | str:
    """What f from `code` returns on each input (an {"error": name} dict where it raised), or a
    sentence saying why the code did not run."""
    mark = f"result-{secrets.token_hex(8)}:"
    result = run_in_sandbox(HARNESS, json.dumps({"code": code, "inputs": inputs, "mark": mark}), LIMITS)
    if result.timed_out:
        return "the code ran out of time"
    lines = [line for line in result.stdout.splitlines() if line.startswith(mark)]
    if not lines:
        return f"the code did not run to the end ({result.killed_reason or 'no result'})"
    outcome = json.loads(lines[-1][len(mark):])
    if isinstance(outcome, dict):
        return f"the code does not define f: {outcome['error']}"
    return outcome


class CodefixEnv(Environment):
    """See the module docstring. Hidden state: `solution`, `inputs`, `expected`."""

    kind = "codefix"

    def __init__(self, seed: int, difficulty: int = 2):
        check_difficulty("codefix", difficulty)
        rng = random.Random(seed)
        while True:
            tokens, _ = _expression(rng, difficulty)  # the depth of the hidden expression
            if len(tokens) < 3 or not any(t in ("x", "y") for t in tokens):
                continue
            pairs = [(x, y) for x in range(-9, 10) for y in range(-9, 10)]
            self.inputs = rng.sample(pairs, HIDDEN_CASES)
            self.expected = _evaluate(tokens, self.inputs)
            buggy = _mutate(rng, tokens)
            # The bug must show on a visible case, or the model could not find it with the tools.
            if _evaluate(buggy, self.inputs[:VISIBLE_CASES]) != self.expected[:VISIBLE_CASES]:
                break
        self.solution, self.buggy = _code(tokens), _code(buggy)
        task = (f"this function has one bug: {self.buggy} . fix it. the tool tests shows test cases and "
                "the tool run checks code against them. answer with the fixed code on one line.")
        tools = [tool_schema("tests", "show the visible test cases"),
                 tool_schema("run", "run code against the visible test cases",
                             code=("string", "python code"))]
        super().__init__(seed, task, tools, difficulty)

    def handlers(self) -> dict[str, Callable[..., str]]:
        return {"tests": self.show_tests, "run": self.run}

    def show_tests(self) -> str:
        return " ".join(f"f({x}, {y}) = {want}." for (x, y), want in
                        zip(self.inputs[:VISIBLE_CASES], self.expected[:VISIBLE_CASES], strict=True))

    def run(self, code: str) -> str:
        got = run_cases(code, self.inputs[:VISIBLE_CASES])
        if isinstance(got, str):
            raise ToolError(got)
        cases = list(zip(self.inputs[:VISIBLE_CASES], self.expected[:VISIBLE_CASES], got, strict=True))
        failed = [(args, want, value) for args, want, value in cases if value != want]
        summary = f"{len(cases) - len(failed)} of {len(cases)} tests pass."
        if not failed:
            return summary
        (x, y), want, value = failed[0]
        shown = value["error"] if isinstance(value, dict) and "error" in value else value
        return f"{summary} f({x}, {y}) should be {want} but is {shown}."

    def verify(self, final_answer: str) -> float:
        got = run_cases(extract_code(final_answer), self.inputs)
        return float(not isinstance(got, str) and got == self.expected)


def make_codefix_env(seed: int, difficulty: int = 2) -> CodefixEnv:
    return CodefixEnv(seed, difficulty)
