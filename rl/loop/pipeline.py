"""Asynchronous RL (`rollout.max_staleness` N > 0): the next batches are sampled while the trainer updates.

A producer thread samples step t's batch with the weights of version

    v(t) = max(first, t - N)                       (behaviour_version; first = the step the run (re)started at)

while the main thread trains on an earlier batch. The lag is a function of the step, never of timing, so an
asynchronous run samples the same batches with the same weights every time (on CPU, bit for bit), and no trained
sample is more than N versions old: batch t is trained by version t of the trainer, so its staleness is t - v(t)
<= N. With N = 0 keel does not use this module (the synchronous loop of rl/loop/driver.py).

Protocol, one lock:
  producer, step t   wait until version v(t) is published; load it into the engines if they hold another (the
                     engines' actor queue runs it after the requests before it: in-flight requests finish on the
                     weights they started with); sample and score; hand the batch over.
  trainer, step s    take batch s; update (version s + 1); publish version s + 1 once the producer has finished
                     batch s + N, the last batch sampled by version s: publishing releases the previous version's
                     file, which a worker restarted mid-batch (rollout/client.py) reloads. The producer cannot
                     start batch s + N + 1 before version s + 1 exists anyway, so the wait costs no overlap.
  evaluation         pause the producer between batches, bring the engines to the newest version, evaluate;
                     the producer reloads its own version when it goes on.
The producer owns the rollout client except while paused, so the client is never used by two threads at once.

Partial rollouts (`rollout.in_flight: partial`, rollout/partial.py): batch t starts on v(t) and, after its first
chunk, moves its unfinished requests to v(t + 1), the version batch t + 1 starts with (when newer), waiting for
the trainer to publish it. The switch point is a function of the step, so partial runs repeat exactly too; the
later tokens are one version fresher, and the overlap is the first chunk's. Version w's last reader is then the
first chunk of batch w + N, so the producer tells publish when it is done with older versions (`floor`: the
oldest version it may still load, v(t + 1) from batch t's switch point or end).

Interrupted or resumed runs drop the batches in flight: a checkpoint holds the trainer at step s, and the resumed
run starts the producer at first = s with the checkpoint's weights (so its first N batches are fresher than an
uninterrupted run's; no step is repeated or lost).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rollout.partial import VersionSwitch

STALE_POLICIES = ("drop", "keep")


def behaviour_version(step: int, first: int, max_staleness: int) -> int:
    """The weight version that samples step `step`'s batch: v(t) = max(first, t - N)."""
    return max(first, step - max_staleness)


def stale_rows(policy_versions: list[int], trainer_version: int, max_staleness: int) -> list[bool]:
    """Which rows are staler than the bound: trainer_version - policy_version > N (a row from a newer version than
    the trainer's cannot exist, and is an error)."""
    newer = [v for v in policy_versions if v > trainer_version]
    if newer:
        raise ValueError(f"rows sampled by version {max(newer)} reached the trainer at version {trainer_version}")
    return [trainer_version - v > max_staleness for v in policy_versions]


class _Stopped(Exception):
    """close() while the producer waited at a switch point."""


class LaggedRollouts:
    """The producer thread of the protocol above. `sample(step)` makes step's batch (in the producer thread, with
    the engines holding version v(step)); `load(handle)` brings the engines to a published version's weights.
    partial: `sample(step, switch)` instead, `switch` (a VersionSwitch, or None when v(step + 1) is not newer)
    moving the engines to v(step + 1) when called."""

    def __init__(self, first: int, steps: int, max_staleness: int, sample: Callable[..., Any],
                 load: Callable[[Any], None], partial: bool = False):
        if max_staleness < 1:
            raise ValueError(f"rollout.max_staleness={max_staleness}: the lagged pipeline needs >= 1 (0 is the "
                             "synchronous loop)")
        self.first, self.steps, self.n = first, steps, max_staleness
        self.sample, self.load, self.partial = sample, load, partial
        self.cond = threading.Condition()
        self.newest = first  # the newest published version; publishing releases the one before
        self.newest_handle: Any = None  # its handle (None for `first`: the engines hold it already)
        self.engine_version = first
        self.finished = first - 1  # the last step the producer has sampled
        self.floor = first  # the oldest version the producer may still load: older ones may be released
        self.ready: dict[int, Any] = {}
        self.busy = self.held = self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._produce, name="keel-rollouts", daemon=True)
        self.thread.start()

    # ---- producer ----------------------------------------------------------------------------------

    def _produce(self) -> None:
        try:
            for t in range(self.first, self.steps):
                v = behaviour_version(t, self.first, self.n)
                with self.cond:
                    self.cond.wait_for(lambda v=v: self.stopping or (not self.held and v <= self.newest))
                    if self.stopping:
                        return
                    self.busy = True
                    handle = self.newest_handle if v == self.newest else None
                try:
                    if self.engine_version != v:
                        if handle is None:
                            raise RuntimeError(f"weight version {v} (step {t}'s) was released before it was loaded")
                        self.load(handle)
                        self.engine_version = v
                    batch = self.sample(t, self._switch_of(t)) if self.partial else self.sample(t)
                finally:
                    with self.cond:
                        self.busy = False
                        self.cond.notify_all()
                with self.cond:
                    self.ready[t] = batch
                    self.finished = t
                    self.floor = max(self.floor, behaviour_version(t + 1, self.first, self.n))
                    self.cond.notify_all()
        except _Stopped:
            return
        except BaseException as err:  # noqa: BLE001 - handed to the trainer thread, which raises it
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def _switch_of(self, t: int) -> VersionSwitch | None:
        """Batch t's switch point: to v(t + 1) when that is newer than v(t)."""
        target = behaviour_version(t + 1, self.first, self.n)
        return VersionSwitch(target, lambda: self._switch(target)) if target > self.engine_version else None

    def _switch(self, target: int) -> int:
        """Between chunks: done with older versions; wait (not busy, so an evaluation may pause the producer here)
        until `target` is published, and load it. Returns it."""
        with self.cond:
            self.floor = max(self.floor, target)
            self.busy = False
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.stopping or (not self.held and target <= self.newest))
            if self.stopping:
                raise _Stopped
            self.busy = True
            handle = self.newest_handle if target == self.newest else None
        if self.engine_version != target:
            if handle is None:
                raise RuntimeError(f"weight version {target} was released before it was loaded")
            self.load(handle)
            self.engine_version = target
        return target

    # ---- trainer side ------------------------------------------------------------------------------

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Wait for `ready` under the lock; raise the producer's error if it failed (polls so Ctrl-C gets through)."""
        while not self.cond.wait_for(lambda: ready() or self.error is not None, timeout=0.5):
            pass
        if self.error is not None and not ready():
            raise self.error

    def take(self, step: int) -> Any:
        """Step `step`'s batch, once the producer has made it."""
        with self.cond:
            self._wait(lambda: step in self.ready)
            return self.ready.pop(step)

    def publish(self, version: int, make_handle: Callable[[], Any]) -> None:
        """Publish the trainer's weights as `version` (= the step just trained + 1): `make_handle()` writes them.
        Waits until the producer is done with version - 1, whose file this releases: every batch sampled by it is
        finished (finish), or the last one's first chunk (partial)."""
        with self.cond:
            self._wait(lambda: self.floor >= version or self.finished >= self.steps - 1)
        handle = make_handle()
        with self.cond:
            self.newest, self.newest_handle = version, handle
            self.cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The producer parked between batches, and the engines at the newest published version."""
        with self.cond:
            self.held = True
            self._wait(lambda: not self.busy)
        try:
            if self.engine_version != self.newest:
                self.load(self.newest_handle)
                self.engine_version = self.newest
            yield
        finally:
            with self.cond:
                self.held = False
                self.cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the producer after its current batch (one stuck in a call is left to the client's shutdown)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout_s)
