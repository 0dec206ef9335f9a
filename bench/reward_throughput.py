"""Reward scoring throughput: samples scored per second for math and for code.

Math: `math_verify` on arithmetic rows whose responses end in a boxed answer (half right).
Code: `code_tests` on a short program with 5 stdin/stdout tests, each test in a fresh sandbox.
Scoring goes through `score_responses` (Ray tasks or local worker processes, bounded pool), after
one warm-up call, so the figures are steady-state; pool start-up is excluded.
Sandbox: the cost of one sandboxed run (`print(1)`, serial, median) in each isolation mode this
host allows: "namespaces" (root), "userns" (what an unprivileged user gets; as root it runs as a
random uid, as a user as that user), "plain" (the weak mode), all with the same interpreter.
Each mode is probed once first, so the figures exclude the one-time probe. Prints figures,
asserts nothing; `--json PATH` also writes them.

    python bench/reward_throughput.py [--backend ray|local] [--n-math 400] [--n-code 40] [--n-sandbox 40]
                                      [--sandbox-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from rewards.sandbox import (
    FALLBACK_INTERPRETER,
    MODES,
    SandboxUnavailable,
    available_isolation,
    is_world_executable,
    resolve_isolation,
    run_in_sandbox,
)
from rewards.scoring import RewardSpec, score_responses

CODE_PAIRS = [(1, 2), (3, 4), (10, 20), (0, 0), (7, 9)]
CODE_TESTS = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in CODE_PAIRS]
CODE_RESPONSE = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def math_batch(n: int) -> tuple[list[str], list[dict]]:
    from rewards.math import generate_arithmetic  # math-verify: not needed by --sandbox-only

    rows = generate_arithmetic(n, seed=0, max_operand=99)
    # Every other response is off by one, so both verdicts are exercised.
    responses = [f"So the result is \\boxed{{{int(r['answer']) + i % 2}}}." for i, r in enumerate(rows)]
    return responses, rows


def samples_per_second(responses: list[str], samples: list[dict], spec: RewardSpec, use_ray: bool,
                       max_concurrency: int) -> float:
    """Score once to warm the pool, then time a second call."""
    score_responses(responses[:max_concurrency * 2], samples[:max_concurrency * 2], [spec],
                    max_concurrency=max_concurrency, use_ray=use_ray)
    start = time.perf_counter()
    results = score_responses(responses, samples, [spec], max_concurrency=max_concurrency, use_ray=use_ray)
    elapsed = time.perf_counter() - start
    failures = [r.reason for r in results if r.reason and "wrong" not in r.reason]
    if failures:
        print(f"warning: {len(failures)} samples had errors, e.g. {failures[0]}")
    return len(responses) / elapsed


def sandbox_interpreter() -> str:
    """One interpreter for every mode, so the figures compare isolation rather than Python start-up:
    the system Python when any uid can run it (root's plain and userns modes need that), else ours."""
    if os.path.exists(FALLBACK_INTERPRETER) and is_world_executable(FALLBACK_INTERPRETER):
        return os.path.realpath(FALLBACK_INTERPRETER)
    return os.path.realpath(sys.executable)


def sandbox_ms_per_run(n: int, interpreter: str) -> dict[str, float | str]:
    """Median wall time of one `print(1)` run per mode, in ms (or why a mode is unavailable).

    The modes take turns run by run, so a busy neighbour on the machine slows all of them alike.
    """
    times: dict[str, list[float]] = {}
    figures: dict[str, float | str] = {}
    for mode in MODES:
        try:
            resolve_isolation(mode, allow_weak=True)  # the one-time probe, not timed
            times[mode] = []
        except SandboxUnavailable as exc:
            figures[mode] = f"unavailable: {exc}"
    for _ in range(n):
        for mode, samples in times.items():
            start = time.perf_counter()
            result = run_in_sandbox("print(1)", isolation=mode, interpreter=interpreter, allow_weak=True)
            samples.append(time.perf_counter() - start)
            assert result.stdout == "1\n", result
    figures.update({mode: round(1000 * statistics.median(samples), 1) for mode, samples in times.items()})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("ray", "local"), default="ray")
    parser.add_argument("--n-math", type=int, default=400)
    parser.add_argument("--n-code", type=int, default=40)
    parser.add_argument("--n-sandbox", type=int, default=40, help="serial runs per isolation mode")
    parser.add_argument("--sandbox-only", action="store_true", help="only the per-mode sandbox cost")
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args()
    figures: dict = {"cpu_count": os.cpu_count(), "euid": os.geteuid(), "isolation": available_isolation()}
    if not args.sandbox_only:
        use_ray = args.backend == "ray"
        if use_ray:
            import ray

            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        math_rps = samples_per_second(*math_batch(args.n_math), RewardSpec("math_verify"), use_ray,
                                      args.max_concurrency)
        code_rps = samples_per_second([CODE_RESPONSE] * args.n_code, [{"tests": CODE_TESTS}] * args.n_code,
                                      RewardSpec("code_tests"), use_ray, args.max_concurrency)
        figures.update({
            "backend": args.backend,
            "max_concurrency": args.max_concurrency,
            "math_samples_per_s": round(math_rps, 1),
            "code_samples_per_s": round(code_rps, 2),
            "code_tests_per_sample": len(CODE_TESTS),
        })
    interpreter = sandbox_interpreter()
    figures["sandbox_interpreter"] = interpreter
    for mode, cost in sandbox_ms_per_run(args.n_sandbox, interpreter).items():
        figures[f"sandbox_ms_per_run_{mode}"] = cost
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
