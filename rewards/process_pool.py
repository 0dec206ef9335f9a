"""Run scoring jobs in a bounded pool of local worker processes, each under a hard deadline.

Rule: at most `max_concurrency` jobs run at once, one per worker process. A job's deadline
starts when it is handed to an idle worker that has already started and imported the rewards'
modules, so start-up does not count against it. A worker whose job passes its deadline is
stopped and replaced: SIGTERM first, which a worker turns into SystemExit so that a sandboxed
run it waits for is killed and reaped (a SIGKILLed worker would leave that run's init a zombie
of pid 1), then SIGKILL after KILL_GRACE_S (a reward stuck in C code ignores anything gentler).
Workers are started with "spawn": forking a process that holds threads (Ray, torch) can
deadlock the child.
"""

from __future__ import annotations

import importlib
import multiprocessing
import signal
import sys
import time
from multiprocessing.connection import Connection, wait

from rewards.evaluation import ScoringJob, evaluate_job, timeout_result
from rewards.registry import RewardResult

WORKER_START_TIMEOUT_S = 300.0
KILL_GRACE_S = 0.5


def exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # unwinds the job, running its clean-up (finally blocks)


def worker_main(conn: Connection, preload: list[str]) -> None:
    """Import `preload`, say "ready", then evaluate jobs until told to stop (None)."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    for module in preload:
        importlib.import_module(module)
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(evaluate_job(job))


class Worker:
    """One worker process and the job it is running."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, preload: list[str]):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child_conn, preload), daemon=True)
        self.process.start()
        child_conn.close()
        self.job_index: int | None = None
        self.deadline = 0.0

    def wait_ready(self) -> None:
        try:
            ready = self.conn.poll(WORKER_START_TIMEOUT_S) and self.conn.recv() == "ready"
        except EOFError:
            ready = False
        if not ready:
            self.process.join(timeout=1.0)
            raise RuntimeError(f"scoring worker did not start (exit code {self.process.exitcode})")

    def kill(self) -> None:
        """Stop the worker now; see the module rule."""
        self.process.terminate()
        self.process.join(timeout=KILL_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.join(timeout=2.0)
        except (OSError, ValueError):
            pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def modules_to_preload(jobs: list[ScoringJob]) -> list[str]:
    """The reward functions' modules; `__main__` is re-imported by spawn itself."""
    return sorted({job.reward.__module__ for job in jobs} - {"__main__", "__mp_main__"})


def poll_result(worker: Worker, timeout_s: float) -> tuple[RewardResult, bool] | None:
    """(result, worker still usable) once the worker's job ended or expired; None while it runs."""
    if worker.conn.poll():
        try:
            return worker.conn.recv(), True
        except EOFError:
            worker.process.join(timeout=1.0)
            return RewardResult(0.0, f"scoring worker died (exit code {worker.process.exitcode})"), False
    if time.monotonic() >= worker.deadline:
        return timeout_result(timeout_s), False
    return None


def replacement(worker: Worker, ctx: multiprocessing.context.BaseContext, preload: list[str]) -> Worker:
    """Kill `worker` and return a started one in its place."""
    worker.kill()
    fresh = Worker(ctx, preload)
    fresh.wait_ready()
    return fresh


def run_jobs_in_processes(
    jobs: list[ScoringJob], timeout_s: float, max_concurrency: int
) -> list[RewardResult]:
    """Evaluate `jobs` in at most `max_concurrency` local processes; see the module rule."""
    if not jobs:
        return []
    ctx = multiprocessing.get_context("spawn")
    preload = modules_to_preload(jobs)
    results: list[RewardResult | None] = [None] * len(jobs)
    idle = [Worker(ctx, preload) for _ in range(min(max_concurrency, len(jobs)))]
    busy: list[Worker] = []
    next_job = 0
    try:
        for worker in idle:
            worker.wait_ready()
        while next_job < len(jobs) or busy:
            while idle and next_job < len(jobs):
                worker = idle.pop()
                try:
                    worker.conn.send(jobs[next_job])
                except Exception as exc:  # an unpicklable reward fails its jobs, not the batch
                    results[next_job] = RewardResult(0.0, f"cannot send to worker: {type(exc).__name__}")
                    idle.append(worker)
                else:
                    worker.job_index, worker.deadline = next_job, time.monotonic() + timeout_s
                    busy.append(worker)
                next_job += 1
            if not busy:
                continue
            wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for worker in list(busy):
                outcome = poll_result(worker, timeout_s)
                if outcome is None:
                    continue
                results[worker.job_index], healthy = outcome
                busy.remove(worker)
                idle.append(worker if healthy else replacement(worker, ctx, preload))
    finally:
        for worker in idle + busy:
            worker.stop()
    return [r if r is not None else RewardResult(0.0, "not scored") for r in results]
