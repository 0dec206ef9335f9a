"""score_responses: weighted sums, and a raising or overrunning reward costing one sample only; pure rewards in
process, the others in workers."""

import os
import time

import pytest

from rewards.math import generate_arithmetic
from rewards.registry import RewardResult, pure_reward
from rewards.scoring import RewardSpec, combine, score_responses


def sleepy_reward(response: str, sample: dict) -> float:
    """Never returns for the response "hang"; otherwise 1."""
    if response == "hang":
        while True:
            time.sleep(0.1)
    return 1.0


def picky_reward(response: str, sample: dict) -> float:
    if response == "boom":
        raise ValueError("cannot score boom")
    if response == "nan":
        return float("nan")
    return 0.25


def test_combine_weights_scores_and_names_failures():
    specs = [RewardSpec("a", 2.0), RewardSpec("b", -1.0)]
    result = combine(specs, [RewardResult(1.0), RewardResult(0.0, "timeout after 3s")])
    assert result == RewardResult(2.0, "b: timeout after 3s", {"a": 1.0, "b": 0.0})


def test_local_scoring_matches_the_rewards():
    rows = generate_arithmetic(12, seed=5)
    responses = [row["answer"] if i % 3 else "wrong" for i, row in enumerate(rows)]
    specs = [RewardSpec("math_verify", 1.0), RewardSpec("exact_match", 0.5),
             RewardSpec("length_penalty", 1.0, {"max_length": 4, "buffer": 2})]
    results = score_responses(responses, rows, specs, use_ray=False)
    for i, result in enumerate(results):
        right = 1.5 if i % 3 else 0.0
        penalty = -1.0 if i % 3 == 0 else (-0.5 if len(responses[i]) == 3 else 0.0)
        assert result.score == pytest.approx(right + penalty)
        assert set(result.components) == {"math_verify", "exact_match", "length_penalty"}


def test_local_scoring_survives_raising_and_hanging_rewards():
    responses = ["ok", "boom", "nan", "hang", "ok"]
    specs = [RewardSpec(f"{__name__}:picky_reward"), RewardSpec(f"{__name__}:sleepy_reward", 2.0)]
    start = time.monotonic()
    results = score_responses(responses, [{}] * 5, specs, timeout_s=1.0, max_concurrency=2, use_ray=False)
    assert time.monotonic() - start < 60
    assert [r.score for r in results] == [2.25, 2.0, 2.0, 0.25, 2.25]
    assert results[0].reason == ""
    assert results[1].reason == f"{__name__}:picky_reward: raised ValueError: cannot score boom"
    assert "non-finite" in results[2].reason
    assert results[3].reason == f"{__name__}:sleepy_reward: timeout after 1s"


def pid_reward(response: str, sample: dict) -> RewardResult:
    """The scoring process's pid, as the reason."""
    return RewardResult(1.0, str(os.getpid()))


@pure_reward
def pure_pid_reward(response: str, sample: dict) -> RewardResult:
    if response == "boom":
        raise ValueError("cannot score boom")
    return RewardResult(1.0, str(os.getpid()))


def test_pure_rewards_run_in_process_and_the_others_in_workers():
    specs = [RewardSpec(f"{__name__}:pure_pid_reward"), RewardSpec(f"{__name__}:pid_reward", 0.5)]
    results = score_responses(["a", "boom", "b"], [{}] * 3, specs, timeout_s=30.0, use_ray=False)
    assert [r.score for r in results] == [1.5, 0.5, 1.5]
    pure_pids = {r.reason.split("; ")[0].split(": ")[1] for r in (results[0], results[2])}
    worker_pids = {r.reason.split("; ")[-1].split(": ")[1] for r in results}
    assert pure_pids == {str(os.getpid())}
    assert str(os.getpid()) not in worker_pids
    assert results[1].reason.startswith(f"{__name__}:pure_pid_reward: raised ValueError: cannot score boom")


def test_pure_rewards_alone_start_no_worker(monkeypatch):
    import rewards.process_pool
    import rewards.ray_pool

    def no_workers(*args, **kwargs):
        raise AssertionError("a pure reward was sent to a worker")

    monkeypatch.setattr(rewards.ray_pool, "run_jobs_with_ray", no_workers)
    monkeypatch.setattr(rewards.process_pool, "run_jobs_in_processes", no_workers)
    rows = generate_arithmetic(256, seed=1)
    responses = [row["answer"] if i % 2 else "x" for i, row in enumerate(rows)]
    results = score_responses(responses, rows, [RewardSpec("exact_match"), RewardSpec("format", 0.0)], use_ray=True)
    assert [r.components["exact_match"] for r in results] == [float(i % 2) for i in range(256)]


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError):
        score_responses(["a"], [], [RewardSpec("format")], use_ray=False)
    with pytest.raises(ValueError):
        score_responses(["a"], [{}], [], use_ray=False)


@pytest.mark.slow
def test_ray_scoring_runs_code_and_survives_a_hanging_reward():
    import ray
    from ray import cloudpickle

    # Ray workers may not have tests/ on their path: ship this module's functions by value.
    cloudpickle.register_pickle_by_value(__import__(__name__))
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        tests = [{"input": f"{a}\n", "output": f"{2 * a}\n"} for a in range(3)]
        responses = ["print(2 * int(input()))", "print(int(input()))", "hang", "print(2 * int(input()))"]
        samples = [{"tests": tests}] * 4
        specs = [RewardSpec("code_tests"), RewardSpec(f"{__name__}:sleepy_reward", 0.5)]
        results = score_responses(responses, samples, specs, timeout_s=3.0, max_concurrency=2, use_ray=True)
        assert [r.score for r in results] == pytest.approx([1.5, 0.5 + 1 / 3, 0.0, 1.5])
        assert "code_tests: 1/3 tests passed" in results[1].reason
        assert f"{__name__}:sleepy_reward: timeout after 3s" in results[2].reason
    finally:
        ray.shutdown()
