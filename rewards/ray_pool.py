"""Run scoring jobs as Ray tasks with a bounded number in flight, each under a deadline.

Rule: at most `max_concurrency` tasks are in flight; a task's deadline starts at its submission;
a task still running at its deadline is cancelled with force (its worker process is killed,
which is the only way to stop a reward stuck in C code) and scores 0 with the reason. Tasks
request no CPUs (`num_cpus=0`): the in-flight bound is what limits them, and a CPU request could
starve them behind the trainer's and rollout workers' reservations on a small machine. Before
the clock starts, one warm-up task per slot imports the rewards' modules so a cold worker does
not spend its first deadline importing math-verify.
"""

from __future__ import annotations

import importlib
import os
import time

import ray

from rewards.evaluation import ScoringJob, evaluate_job, timeout_result
from rewards.process_pool import modules_to_preload
from rewards.registry import RewardResult

WARMUP_TIMEOUT_S = 300.0


@ray.remote(num_cpus=0, max_retries=0)
def evaluate_remote(job: ScoringJob) -> RewardResult:
    return evaluate_job(job)


@ray.remote(num_cpus=0, max_retries=0)
def preload_remote(modules: list[str]) -> int:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            # A module the worker cannot import by name (e.g. shipped by value via cloudpickle)
            # only loses its warm-up; the job itself still carries the function.
            pass
    return os.getpid()


def run_jobs_with_ray(jobs: list[ScoringJob], timeout_s: float, max_concurrency: int) -> list[RewardResult]:
    """Evaluate `jobs` as Ray tasks; see the module rule. Starts a local Ray if none is running."""
    if not jobs:
        return []
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    ray.get([preload_remote.remote(modules_to_preload(jobs)) for _ in range(max_concurrency)],
            timeout=WARMUP_TIMEOUT_S)
    results: list[RewardResult | None] = [None] * len(jobs)
    in_flight: dict[ray.ObjectRef, tuple[int, float]] = {}
    next_job = 0
    while next_job < len(jobs) or in_flight:
        while len(in_flight) < max_concurrency and next_job < len(jobs):
            in_flight[evaluate_remote.remote(jobs[next_job])] = (next_job, time.monotonic() + timeout_s)
            next_job += 1
        earliest = min(deadline for _, deadline in in_flight.values())
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.0, earliest - time.monotonic()))
        for ref in ready:
            index, _ = in_flight.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                results[index] = RewardResult(0.0, f"ray task failed: {type(exc).__name__}")
        now = time.monotonic()
        for ref, (index, deadline) in list(in_flight.items()):
            if now >= deadline:
                ray.cancel(ref, force=True)
                results[index] = timeout_result(timeout_s)
                del in_flight[ref]
    return [r if r is not None else RewardResult(0.0, "not scored") for r in results]
