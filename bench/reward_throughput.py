"""Reward scoring throughput: samples scored per second for math and for code.

Math: `math_verify` on arithmetic rows whose responses end in a boxed answer (half right).
Code: `code_tests` on a short program with 5 stdin/stdout tests, each test in a fresh sandbox.
Scoring goes through `score_responses` (Ray tasks or local worker processes, bounded pool), after
one warm-up call, so the figures are steady-state; pool start-up is excluded. Prints figures,
asserts nothing; `--json PATH` also writes them.

    python bench/reward_throughput.py [--backend ray|local] [--n-math 400] [--n-code 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from rewards.math import generate_arithmetic
from rewards.sandbox import available_isolation, run_in_sandbox
from rewards.scoring import RewardSpec, score_responses

CODE_PAIRS = [(1, 2), (3, 4), (10, 20), (0, 0), (7, 9)]
CODE_TESTS = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in CODE_PAIRS]
CODE_RESPONSE = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def math_batch(n: int) -> tuple[list[str], list[dict]]:
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


def sandbox_runs_per_second(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        run_in_sandbox("print(1)")
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("ray", "local"), default="ray")
    parser.add_argument("--n-math", type=int, default=400)
    parser.add_argument("--n-code", type=int, default=40)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args()
    use_ray = args.backend == "ray"
    if use_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    math_rps = samples_per_second(*math_batch(args.n_math), RewardSpec("math_verify"), use_ray,
                                  args.max_concurrency)
    code_rps = samples_per_second([CODE_RESPONSE] * args.n_code, [{"tests": CODE_TESTS}] * args.n_code,
                                  RewardSpec("code_tests"), use_ray, args.max_concurrency)
    figures = {
        "backend": args.backend,
        "max_concurrency": args.max_concurrency,
        "cpu_count": os.cpu_count(),
        "isolation": available_isolation(),
        "math_samples_per_s": round(math_rps, 1),
        "code_samples_per_s": round(code_rps, 2),
        "code_tests_per_sample": len(CODE_TESTS),
        "sandbox_runs_per_s_serial": round(sandbox_runs_per_second(20), 1),
    }
    for key, value in figures.items():
        print(f"{key:28s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
