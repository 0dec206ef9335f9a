"""Code reward: run the response's program against the sample's tests, each in a fresh sandbox.

sample["tests"] is a list (or its JSON text) of tests in one of two styles:
- stdin/stdout: {"input": "1 2\\n", "output": "3\\n"}: the program reads stdin; its stdout must
  equal the expected output up to trailing whitespace on each line and trailing blank lines;
- function call: {"fn_name": "add", "args": [1, 2], "kwargs": {}, "expected": 3}: the program is
  loaded as a module (so a `__main__` block does not run) and the function, or the method of a
  `Solution` class, is called; its JSON-encoded result must equal "expected" (floats to 1e-6).
The expected values never enter the sandbox. Reward: the fraction of tests passed ("fraction")
or 1.0 only when all pass ("all_pass", which stops at the first failure).
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass

from rewards.registry import RewardResult
from rewards.sandbox import MIB, SandboxLimits, SandboxResult, run_in_sandbox

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_CALL_HARNESS = """
import json as _keel_json
import sys as _keel_sys
_keel_ns = {{"__name__": "solution"}}
exec(compile({program!r}, "solution.py", "exec"), _keel_ns)
_keel_fn = _keel_ns.get({fn_name!r})
if _keel_fn is None and "Solution" in _keel_ns:
    _keel_fn = getattr(_keel_ns["Solution"](), {fn_name!r})
_keel_result = _keel_fn(*_keel_json.loads({args!r}), **_keel_json.loads({kwargs!r}))
_keel_sys.stdout.write("\\n" + {marker!r} + _keel_json.dumps(_keel_result) + "\\n")
"""


@dataclass(frozen=True)
class TestOutcome:
    passed: bool
    reason: str = ""


def extract_program(response: str) -> str:
    """The last ```python (or untagged) fenced block, else the whole response."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(response)]
    python_blocks = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    return python_blocks[-1] if python_blocks else response


def outputs_match(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    def canonical(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return canonical(actual) == canonical(expected)


def values_match(actual: object, expected: object) -> bool:
    """JSON values equal, with floats compared to 1e-6 (relative or absolute)."""
    if isinstance(expected, float) or isinstance(actual, float):
        return (isinstance(actual, (int, float)) and isinstance(expected, (int, float))
                and math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-6))
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(map(values_match, actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(values_match(actual[k], expected[k]) for k in actual)
    return type(actual) is type(expected) and actual == expected


def failure_reason(result: SandboxResult) -> str | None:
    """Why the run cannot count as a pass, before looking at its output; None when it ran fine."""
    if result.killed_reason:
        return result.killed_reason
    if result.exit_code != 0:
        last_line = (result.stderr.strip().splitlines() or [""])[-1][:200]
        return f"runtime error (exit {result.exit_code}): {last_line}".rstrip(": ")
    return None


def run_stdin_test(program: str, test: dict, limits: SandboxLimits, isolation: str | None,
                   allow_weak: bool = False) -> TestOutcome:
    result = run_in_sandbox(program, stdin=test.get("input", ""), limits=limits, isolation=isolation,
                            allow_weak=allow_weak)
    reason = failure_reason(result)
    if reason:
        return TestOutcome(False, reason)
    if not outputs_match(result.stdout, test["output"]):
        return TestOutcome(False, "wrong answer")
    return TestOutcome(True)


def run_call_test(program: str, test: dict, limits: SandboxLimits, isolation: str | None,
                  allow_weak: bool = False) -> TestOutcome:
    # A fresh random marker per run: the result line is the last line that starts with it.
    marker = f"@keel-result-{secrets.token_hex(8)}@"
    harness = _CALL_HARNESS.format(program=program, fn_name=test["fn_name"], marker=marker,
                                   args=json.dumps(test.get("args", [])),
                                   kwargs=json.dumps(test.get("kwargs", {})))
    result = run_in_sandbox(harness, limits=limits, isolation=isolation, allow_weak=allow_weak)
    reason = failure_reason(result)
    if reason:
        return TestOutcome(False, reason)
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return TestOutcome(False, "no result returned")
    try:
        actual = json.loads(lines[-1][len(marker):])
    except json.JSONDecodeError:
        return TestOutcome(False, "result is not JSON")
    if not values_match(actual, test["expected"]):
        return TestOutcome(False, "wrong answer")
    return TestOutcome(True)


def run_test(program: str, test: dict, limits: SandboxLimits, isolation: str | None = None,
             allow_weak: bool = False) -> TestOutcome:
    """Run one test of either style."""
    if "fn_name" in test:
        return run_call_test(program, test, limits, isolation, allow_weak)
    return run_stdin_test(program, test, limits, isolation, allow_weak)


def code_tests_reward(
    response: str,
    sample: dict,
    mode: str = "fraction",
    time_limit_s: float | None = None,
    memory_mb: int = 256,
    max_processes: int = 16,
    isolation: str | None = None,
    allow_weak: bool = False,
) -> RewardResult:
    """Fraction of sample["tests"] passed ("fraction"), or 1.0 iff all pass ("all_pass").

    Each test runs in its own sandbox with a wall-time limit of `time_limit_s` (default
    sample["time_limit_s"], else 2 s); `isolation` picks the sandbox mode (default: strongest
    available) and `allow_weak` accepts the weak plain mode where nothing stronger works (else the
    sandbox refuses, see rewards/SECURITY.md). The reason names how many passed and the first failure.
    """
    if mode not in ("fraction", "all_pass"):
        raise ValueError(f"mode must be 'fraction' or 'all_pass', not {mode!r}")
    tests = sample["tests"]
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not tests:
        raise ValueError("sample has no tests")
    limits = SandboxLimits(wall_time_s=float(time_limit_s or sample.get("time_limit_s", 2.0)),
                           memory_bytes=memory_mb * MIB, max_processes=max_processes)
    program = extract_program(response)
    passed, first_failure = 0, ""
    for index, test in enumerate(tests):
        outcome = run_test(program, test, limits, isolation, allow_weak)
        passed += outcome.passed
        if not outcome.passed and not first_failure:
            first_failure = f"test {index}: {outcome.reason}"
            if mode == "all_pass":
                return RewardResult(0.0, f"all_pass: failed {first_failure}")
    if passed == len(tests):
        return RewardResult(1.0)
    summary = f"{passed}/{len(tests)} tests passed; first failure {first_failure}"
    return RewardResult(passed / len(tests), summary)
