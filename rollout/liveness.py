"""Whether a rollout worker's engine still runs, and how long a call to it may take.

Two ways an engine dies under a live worker, both seen as a hang before this module:
- vLLM's engine core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1, and vLLM's default on CUDA) is
  killed (the kernel's OOM killer picks it first: it holds the weights and the KV cache). vLLM's own monitor
  marks the engine dead and shuts its client down, but a `generate` already waiting for outputs (or a
  `collective_rpc` waiting for its reply) is never woken: it waits forever. `EngineWatch` waits on the engine
  processes' sentinels, records the cause, and wakes those waits, so the call raises `EngineDied`.
- The engine core in the worker's own process (keel's CPU default) dies with the worker: Ray sees the actor
  die and `RolloutClient` restarts it. An engine that hangs instead of dying is caught by the client's deadline
  (`call_deadline`), after which the client kills and restarts the worker.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import connection


class EngineDied(RuntimeError):
    """The worker's vLLM engine is gone; the message says which process and how it ended. The worker is
    unusable: `RolloutClient` restarts it and re-issues its share."""


def exit_cause(exitcode: int | None) -> str:
    """How a process ended, from multiprocessing's exit code (negative: the signal that killed it)."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by signal {-exitcode}" + (" (SIGKILL: the OOM killer, or kill -9)" if exitcode == -9 else "")
    return f"exited with code {exitcode}"


def call_deadline(timeout_s: float, per_token_s: float, max_tokens: int, n_requests: int, max_num_seqs: int) -> float:
    """Seconds a generate call may take before its worker counts as hung:

        deadline = timeout_s + per_token_s * max_tokens * ceil(n_requests / max_num_seqs)

    The engine decodes at most max_num_seqs sequences at a time, each for up to max_tokens steps, so the
    second term bounds the decode steps of a call; timeout_s covers everything else (prefill, the rpc,
    a first step's compilation). Calls without sampling (a weight load) get timeout_s alone (max_tokens 0).
    """
    waves = math.ceil(max(n_requests, 1) / max(max_num_seqs, 1))
    return timeout_s + per_token_s * max_tokens * waves


class EngineWatch:
    """Watches the engine core processes of an `LLM` (none when the core runs in this process)."""

    def __init__(self, llm) -> None:
        self.core = llm.llm_engine.engine_core
        manager = getattr(getattr(self.core, "resources", None), "engine_manager", None)
        self.processes = list(getattr(manager, "processes", None) or [])
        self.cause: str | None = None
        self.stopping = threading.Event()
        if self.processes:
            threading.Thread(target=self._watch, name="keel-engine-watch", daemon=True).start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def check(self) -> None:
        """Raise EngineDied if the engine is known to be gone."""
        if self.cause is not None:
            raise EngineDied(self.cause)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around a call into the engine: EngineDied (naming the cause) if the engine is gone or goes during it."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self.check()
        try:
            yield
        except Exception as err:
            if self.cause is not None:
                raise EngineDied(self.cause) from None
            if isinstance(err, EngineDeadError):  # the core failed in its own process and said so
                self.cause = f"vLLM's engine core died: {err}"
                raise EngineDied(self.cause) from err
            raise

    def stop(self) -> None:
        """The engine is being shut down on purpose: its processes' exits are not a death."""
        self.stopping.set()

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        while not self.stopping.is_set():
            dead = connection.wait(list(sentinels), timeout=1.0)
            if dead and not self.stopping.is_set():
                proc = sentinels[dead[0]]
                proc.join(timeout=1.0)  # reaped, so that its exit code is known
                self.cause = f"vLLM engine core process {proc.pid} ({proc.name}) {exit_cause(proc.exitcode)}"
                self._wake()
                return

    def _wake(self) -> None:
        """Fail what waits on the dead engine: generate's output queue and pending collective_rpc replies."""
        error = EngineDied(self.cause)
        queue = getattr(self.core, "outputs_queue", None)
        if queue is not None:
            queue.put_nowait(error)
        for future in list(getattr(self.core, "utility_results", {}).values()):
            if hasattr(future, "set_exception") and not future.done():
                future.set_exception(error)


class RolloutWorkerFailed(RuntimeError):
    """A rollout worker failed more often than `max_restarts` allows (or did not come back from a restart);
    the message names the worker and the last cause."""
