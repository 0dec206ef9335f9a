"""Asynchronous RL's lag protocol (rl/loop/pipeline.py) and the staleness guard (rl/loop/step.py: drop_stale).

The protocol is plain Python threads around two callables, so it is tested here with in-process ones: an "engine"
that holds one weight version and a store of published versions that forgets the previous one on each publish,
as the trainer's /dev/shm files do. The real stack runs it in tests/test_async_rl.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest

from rl.algo.batch import make_rollout_batch, rollout_schema
from rl.loop.pipeline import LaggedRollouts, behaviour_version, stale_rows
from rl.loop.step import drop_stale


def test_behaviour_version_lags_by_n_from_the_first_step():
    assert [behaviour_version(t, 0, 1) for t in range(5)] == [0, 0, 1, 2, 3]
    assert [behaviour_version(t, 0, 2) for t in range(5)] == [0, 0, 0, 1, 2]
    assert [behaviour_version(t, 7, 2) for t in range(7, 12)] == [7, 7, 7, 8, 9]  # resumed at step 7


def test_stale_rows_by_hand():
    assert stale_rows([5, 4, 3, 2], trainer_version=5, max_staleness=2) == [False, False, False, True]
    assert stale_rows([5, 5], trainer_version=5, max_staleness=0) == [False, False]
    with pytest.raises(ValueError, match="version 6 reached the trainer at version 5"):
        stale_rows([6], trainer_version=5, max_staleness=1)


class Store:
    """Published weight versions as the trainer keeps them: publishing one releases the one before."""

    def __init__(self):
        self.live: set[int] = set()
        self.lock = threading.Lock()

    def publish(self, version: int) -> int:
        with self.lock:
            self.live = {version}
        return version

    def open(self, handle: int) -> int:
        with self.lock:
            if handle not in self.live:
                raise RuntimeError(f"version {handle} was released")
        return handle


def drive_trainer(rollouts: LaggedRollouts, first: int, steps: int, rng: random.Random,
                  publish: Callable[[int], int], engine: dict, eval_at: tuple[int, ...]) -> tuple[dict, dict]:
    """The trainer's side of the lag protocol: take step s's batch, update (a random pause), publish version s+1,
    and at the steps in `eval_at` read the engine's version while the producer is paused. Returns what each step
    took and what each evaluation saw; the pipeline is closed on the way out."""
    taken, evaluated = {}, {}
    try:
        for s in range(first, steps):
            taken[s] = rollouts.take(s)
            time.sleep(rng.random() * 0.004)  # the update
            rollouts.publish(s + 1, lambda s=s: publish(s + 1))
            if s + 1 in eval_at:
                with rollouts.paused():
                    evaluated[s + 1] = engine["version"]
    finally:
        rollouts.close()
    return taken, evaluated


def run_protocol(first: int, steps: int, n: int, seed: int, eval_at: tuple[int, ...] = ()) -> dict:
    """A run's schedule under random timings: which version sampled each batch, and what evaluations saw."""
    rng = random.Random(seed)
    store, engine = Store(), {"version": first}

    def sample(t: int) -> tuple[int, int]:
        time.sleep(rng.random() * 0.004)
        if engine["version"] != first:  # the file a restarted worker would reload is still there (first: a checkpoint)
            store.open(engine["version"])
        return t, engine["version"]

    def load(handle: int) -> None:
        time.sleep(rng.random() * 0.002)
        engine["version"] = store.open(handle)

    taken, evaluated = drive_trainer(LaggedRollouts(first, steps, n, sample, load), first, steps, rng,
                                     store.publish, engine, eval_at)
    assert all(t == s for s, (t, _) in taken.items())
    return {"sampled": {s: version for s, (_, version) in taken.items()}, "evaluated": evaluated}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_each_batch_is_sampled_by_its_lagged_version_whatever_the_timing(n):
    runs = [run_protocol(0, 12, n, seed, eval_at=(4, 9)) for seed in range(6)]
    for r in runs:  # no published version was released before the batches sampled by it were done
        assert r["sampled"] == {s: behaviour_version(s, 0, n) for s in range(12)}
        assert all(s - v <= n for s, v in r["sampled"].items())  # the staleness bound
        assert r["evaluated"] == {4: 4, 9: 9}  # evaluations see the trainer's newest weights


def test_a_resumed_run_starts_its_lag_at_the_checkpoint():
    assert run_protocol(5, 9, 2, seed=0)["sampled"] == {5: 5, 6: 5, 7: 5, 8: 6}


def test_a_producer_error_reaches_the_trainer():
    def sample(t: int) -> int:
        if t == 2:
            raise ValueError("engine died at step 2")
        return t

    rollouts = LaggedRollouts(0, 5, 1, sample, lambda handle: None)
    try:
        assert rollouts.take(0) == 0
        rollouts.publish(1, lambda: 1)
        assert rollouts.take(1) == 1
        with pytest.raises(ValueError, match="engine died at step 2"):  # at the trainer's next wait
            rollouts.publish(2, lambda: 2)
            rollouts.take(2)
    finally:
        rollouts.close()


def test_n_zero_is_not_a_lagged_pipeline():
    with pytest.raises(ValueError, match="max_staleness=0"):
        LaggedRollouts(0, 3, 0, lambda t: t, lambda h: None)


def _batch(versions: list[int]):
    rows = [dict(prompt_index=i // 2, sample_index=i % 2, prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0],
                 finish_reason="stop", policy_version=v, reward=1.0) for i, v in enumerate(versions)]
    return make_rollout_batch(rows, rollout_schema(1, 2, 8))


def test_drop_stale_drops_rows_past_the_bound_and_counts_them():
    collected = (_batch([3, 3, 1, 1]), {"time/rollout": 0.1}, ["a", "b", "c", "d"])
    (batch, _, texts), metrics = drop_stale(collected, step=3, max_staleness=1, policy="drop")
    assert batch.column("policy_version").to_pylist() == [3, 3] and texts == ["a", "b"]
    assert metrics == {"async/staleness_mean": 1.0, "async/staleness_max": 2.0, "async/stale_samples": 2.0,
                       "async/dropped_samples": 2.0}
    (batch, _, texts), metrics = drop_stale(collected, step=3, max_staleness=1, policy="keep")
    assert batch.num_rows == 4 and texts == ["a", "b", "c", "d"] and metrics["async/dropped_samples"] == 0.0
