"""The rollout pieces that need no engine: kept sets, request checks, serving view, weight handles."""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout import sampling_mask, serving, weight_sync
from rollout.worker import check_sampling

INF = -math.inf


def test_kept_set_is_read_when_a_candidate_is_cut():
    assert sampling_mask.kept_set({5: -0.1, 3: -2.0, 9: INF, 1: INF}, 4, 0, 64) == [3, 5]


def test_kept_set_is_complete_when_top_k_fits_the_candidates():
    assert sampling_mask.kept_set({5: -0.1, 3: -2.0, 7: -3.0}, 3, 3, 64) == [3, 5, 7]


def test_kept_set_that_may_not_fit_is_an_error_naming_the_settings():
    with pytest.raises(sampling_mask.SamplingMaskError, match="logprobs_candidates=3.*top_k"):
        sampling_mask.kept_set({5: -0.1, 3: -2.0, 7: -3.0}, 3, 0, 64)
    # the sampled token came from outside the N most likely: more than N tokens were kept
    with pytest.raises(sampling_mask.SamplingMaskError):
        sampling_mask.kept_set({5: -0.1, 3: -2.0, 7: -3.0}, 2, 0, 64)


def test_candidates_needed():
    assert sampling_mask.candidates_needed(0, 1.0, 64, None) == 0  # no truncation: mask "all"
    assert sampling_mask.candidates_needed(64, 1.0, 64, None) == 0
    assert sampling_mask.candidates_needed(8, 0.9, 64, None) == 8
    assert sampling_mask.candidates_needed(0, 0.9, 64, 64) == 64
    with pytest.raises(sampling_mask.SamplingMaskError, match="logprobs_candidates"):
        sampling_mask.candidates_needed(0, 0.9, 64, None)


@pytest.mark.parametrize(
    "sampling, match",
    [({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"n": 0}, "sampling.n"),
     ({"max_tokens": 0}, "max_tokens"), ({"stop_token_ids": [999]}, "stop_token_ids"),
     ({"top_k": 300}, "logprobs_candidates=300 exceeds engine.max_logprobs=256"), ({"topk": 3}, "unknown")],
)
def test_bad_sampling_settings_name_the_field(sampling, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(sampling, vocab_size=512, max_logprobs=256)


def test_kept_sets_recorded_by_the_engine_need_no_candidates():
    top_p_only = {"top_p": 0.9, "logprobs_candidates": 2}
    with pytest.raises(sampling_mask.SamplingMaskError):  # read off candidates (CUDA): 2 may not hold it
        check_sampling({"top_p": 0.9}, vocab_size=512, max_logprobs=256)
    assert check_sampling(top_p_only, 512, 256, kept_from_engine=True)["logprobs_candidates"] == 0
    assert check_sampling({"top_k": 300}, 512, 256, kept_from_engine=True)["logprobs_candidates"] == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from rl.model.presets import preset

    path = tmp_path_factory.mktemp("tiny")
    DeepseekV32ForCausalLM(DeepseekV32Config(**preset("tiny"))).save_pretrained(path)
    return str(path)


def test_model_facts(checkpoint):
    f = serving.model_facts(checkpoint)
    assert (f.vocab_size, f.moe_layers, f.top_k, f.n_routed_experts, f.index_topk) == (64, 1, 2, 8, 64)


def test_cpu_serving_view_is_dense_deepseek_v3_over_the_same_files(checkpoint, tmp_path):
    cuda_view = serving.ServingView(checkpoint, cuda=True, root=str(tmp_path))
    cfg = json.loads((Path(cuda_view.path) / "config.json").read_text())
    # CUDA: still DeepSeek-V3.2 with its DSA fields, plus the gate settings vLLM reads.
    assert cfg["model_type"] == "deepseek_v32" and cfg["index_topk"] == 64
    assert (cfg["topk_method"], cfg["scoring_func"]) == ("noaux_tc", "sigmoid")
    cuda_view.cleanup()  # never removes the checkpoint itself
    assert not Path(cuda_view.path).exists() and (Path(checkpoint) / "config.json").is_file()
    view = serving.ServingView(checkpoint, cuda=False, root=str(tmp_path))
    path = Path(view.path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert (cfg["topk_method"], cfg["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert "index_topk" not in cfg and cfg["kv_lora_rank"] == 512
    assert (path / "model.safetensors").resolve() == (Path(checkpoint) / "model.safetensors").resolve()
    view.cleanup()
    view.cleanup()  # twice is fine
    assert not path.exists() and (Path(checkpoint) / "model.safetensors").is_file()


def test_serving_view_is_removed_when_dropped_and_at_exit(checkpoint, tmp_path):
    view = serving.ServingView(checkpoint, cuda=False, root=str(tmp_path))
    path = Path(view.path)
    del view
    gc.collect()
    assert not path.exists()
    code = (f"from rollout.serving import ServingView; v = ServingView({checkpoint!r}, False, {str(tmp_path)!r}); "
            "print(v.path)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(tmp_path)) and not Path(out.stdout.strip()).exists()


def test_views_of_dead_processes_are_swept(checkpoint, tmp_path):
    done = subprocess.Popen(["true"])
    done.wait()  # its pid now names no process
    host = serving._host()
    dead = tmp_path / f"keel-serving-{done.pid}@{host}-abc123"
    live = tmp_path / f"keel-serving-{os.getpid()}@{host}-def456"
    elsewhere = tmp_path / f"keel-serving-{done.pid}@another.host-ghi789"
    for d in (dead, live, elsewhere):
        d.mkdir()
    view = serving.ServingView(checkpoint, cuda=False, root=str(tmp_path))
    assert not dead.exists() and live.exists() and elsewhere.exists() and Path(view.path).exists()
    view.cleanup()


def test_requests_past_index_topk_are_served_up_to_max_model_len(checkpoint):
    """CPU engines serve DSA sparse past index_topk (rollout.sparse_serving): only max_model_len limits."""
    facts = serving.model_facts(checkpoint)
    for cuda in (False, True):
        serving.check_request([1] * 32, 33, facts, 512, cuda=cuda)  # past index_topk (64)
        with pytest.raises(ValueError, match="max_model_len"):
            serving.check_request([1] * 32, 33, facts, 64, cuda=cuda)
    assert serving.serves_sparse(facts, 512, cuda=False)
    assert not serving.serves_sparse(facts, 64, cuda=False)  # index_topk >= max_model_len: dense MLA is exact
    assert not serving.serves_sparse(facts, 512, cuda=True)  # vLLM's native DSA


def test_weight_stream_casts_one_bucket_at_a_time_in_metadata_order():
    from torch import nn

    from trainer import sharding

    model = nn.Module()
    model.x = nn.Parameter(torch.ones(4, 4))  # 64 B of fp32 (buckets count fp32 bytes): with y at 100 B
    model.y = nn.Parameter(torch.arange(8.0))  # 32 B
    model.register_buffer("z", torch.ones(2, 2, dtype=torch.float64).t())  # 16 B more: a bucket of its own
    stream = sharding.weight_stream(model, torch.bfloat16, 100)
    assert [[n for n, _ in b] for b in stream.buckets()] == [["x", "y"], ["z"]]
    assert stream.shapes() == [("x", (4, 4)), ("y", (8,)), ("z", (2, 2))]  # the order vLLM's receiver is told
    sent = list(stream)
    assert [n for n, _ in sent] == ["x", "y", "z"]
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for _, t in sent)
    assert torch.equal(sent[1][1].float(), model.y.detach()) and sent[2][1].shape == (2, 2)
    assert [n for n, _ in stream] == ["x", "y", "z"]  # a fresh pass each time
    assert [[n for n, _ in b] for b in sharding.weight_stream(model, torch.bfloat16, 1).buckets()] == [
        ["x"], ["y"], ["z"]]  # a tensor over the bound goes alone
    assert weight_sync.wire_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="engine dtype"):
        weight_sync.wire_dtype("auto")


def test_each_rollout_worker_gets_its_own_nccl_ranks():
    from rollout.client import WorkerWeightSyncClient

    assert weight_sync.worker_rank_offsets(3, 2) == [1, 3, 5]  # trainer rank 0, then 2 TP ranks per worker
    client = WorkerWeightSyncClient(["w0", "w1", "w2"], ranks_per_worker=2)
    info = {"master_address": "10.0.0.1", "master_port": 1234, "rank_offset": 1, "world_size": 7, "packed": True}
    payloads = client.init_payloads(info)
    assert [p["rank_offset"] for p in payloads] == [1, 3, 5]
    assert all({k: v for k, v in p.items() if k != "rank_offset"} == {k: v for k, v in info.items()
                                                                      if k != "rank_offset"} for p in payloads)
    with pytest.raises(ValueError, match="rank_offset"):
        client.init_payloads({**info, "rank_offset": 2})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nccl_weight_sender_needs_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        weight_sync.NcclWeightSender(None, None, 1 << 20, 2)


def test_published_weights_round_trip_and_are_checked(checkpoint, tmp_path):
    from safetensors.torch import load_file

    expected = weight_sync.checkpoint_shapes(checkpoint)
    assert any(".indexer." in n for n in expected)
    tensors = load_file(str(Path(checkpoint) / "model.safetensors"))
    handle = weight_sync.publish_weights(tensors, version=3, directory=str(tmp_path))
    weight_sync.check_weights(handle.shapes, expected)
    back = load_file(handle.path)
    assert handle.version == 3 and all(torch.equal(back[n], t) for n, t in tensors.items())
    weight_sync.release_weights(handle)
    assert not Path(handle.path).exists()
    name = next(iter(expected))
    with pytest.raises(ValueError, match="wrong shape"):
        weight_sync.check_weights({**expected, name: (1, 2, 3)}, expected)
    with pytest.raises(ValueError, match="missing"):
        weight_sync.check_weights({n: s for n, s in expected.items() if n != name}, expected)
    with pytest.raises(ValueError, match="not in the checkpoint"):
        weight_sync.check_weights({**expected, "lm_head.bias": (64,)}, expected)


@pytest.mark.parametrize(
    "setting, workers, plan",
    [
        ("shm", ["a", "b"], (True, False)),  # never the object store, even with a worker elsewhere
        ("object_store", ["a"], (False, True)),  # always, even on one node
        ("auto", ["a", "a"], (True, False)),  # all on the driver's node: the file only
        ("auto", ["a", "b"], (True, True)),  # mixed: the file for "a", the blob for "b"
        ("auto", ["b", "c"], (False, True)),  # none on the driver's node: no file
    ],
)
def test_weight_transport_plan(setting, workers, plan):
    assert weight_sync.plan_transport(setting, "a", workers) == plan


def test_the_client_plans_transport_from_the_publishers_node(monkeypatch):
    """Trainer rank 0 publishes, so the plan compares the workers' nodes with rank 0's (not the driver's); a
    worker that moved off the publisher's node gets the handle with a blob attached."""
    import dataclasses

    from rollout.client import RolloutClient

    client = object.__new__(RolloutClient)  # no engines: only the planning state
    client.weight_transport, client.worker_nodes = "auto", ["a", "a"]
    assert client.transport_plan("a") == (True, False)
    assert client.transport_plan("trainer-node") == (False, True)
    handle = weight_sync.WeightHandle(path="/dev/shm/x", version=1, host="h", shapes={}, node="a")
    assert client._reachable(handle) is handle
    monkeypatch.setattr(weight_sync, "attach_blob", lambda h: dataclasses.replace(h, blob="ref"))
    client.worker_nodes = ["a", "b"]  # a worker restarted on node b
    assert client._reachable(handle).blob == "ref"


def test_a_checkpoint_handle_reads_the_checkpoint_in_place_and_is_never_deleted(checkpoint):
    handle = weight_sync.checkpoint_handle(checkpoint, version=2)
    assert handle.path == str((Path(checkpoint) / "model.safetensors").resolve()) and not handle.owned
    assert handle.shapes == weight_sync.checkpoint_shapes(checkpoint)
    weight_sync.release_weights(handle)
    assert Path(handle.path).exists()


def test_unknown_weight_transport_is_refused(checkpoint):
    with pytest.raises(ValueError, match="weight_transport"):
        weight_sync.plan_transport("nfs", "a", ["a"])
    from rollout.client import RolloutClient

    with pytest.raises(ValueError, match="weight_transport must be one of"):  # before any Ray actor starts
        RolloutClient(checkpoint, 1, {"weight_transport": "nfs"})


def test_weights_reach_a_worker_through_file_or_blob(checkpoint, tmp_path, monkeypatch):
    """A visible file is read in place; otherwise the blob is copied to a local temp file, loaded, removed."""
    import ray
    from safetensors.torch import load_file

    monkeypatch.setattr(ray, "put", lambda value: ("ref", value))  # no Ray: the "ref" carries the value
    monkeypatch.setattr(weight_sync, "fetch_blob", lambda blob: blob[1])
    tensors = load_file(str(Path(checkpoint) / "model.safetensors"))
    both = weight_sync.publish_weights(tensors, 4, directory=str(tmp_path / "pub"), file=True, blob=True)
    assert Path(both.path).read_bytes() == both.blob[1].tobytes()

    with weight_sync.weights_file(both, directory=str(tmp_path)) as (path, source):
        assert (path, source) == (both.path, "file")  # visible: no object-store fetch
    Path(both.path).unlink()  # as seen from another node: the file is out of reach
    with weight_sync.weights_file(both, directory=str(tmp_path)) as (path, source):
        assert source == "object_store" and Path(path).parent == tmp_path
        assert Path(path).name.startswith(weight_sync.RECEIVED_PREFIX)
        back = load_file(path)
        assert all(torch.equal(back[n], t) for n, t in tensors.items())
    assert not Path(path).exists()
    with pytest.raises(RuntimeError, match="load failed"), weight_sync.weights_file(both, str(tmp_path)) as (p, _):
        raise RuntimeError("load failed")
    assert not Path(p).exists()  # removed on error too

    blob_only = weight_sync.publish_weights(tensors, 5, file=False, blob=True)
    assert blob_only.path == "" and blob_only.blob is not None
    weight_sync.release_weights(blob_only)  # no file: nothing to delete

    file_only = weight_sync.publish_weights(tensors, 6, directory=str(tmp_path / "pub"))
    assert file_only.blob is None
    Path(file_only.path).unlink()
    with pytest.raises(FileNotFoundError, match=rf"host {file_only.host}.*weight_transport='object_store'"):
        with weight_sync.weights_file(file_only, directory=str(tmp_path)):
            pass
    assert not list(tmp_path.glob(f"{weight_sync.RECEIVED_PREFIX}*"))


def test_received_copies_of_dead_processes_are_swept(tmp_path):
    done = subprocess.Popen(["true"])
    done.wait()  # its pid now names no process
    host = socket.gethostname()
    dead = tmp_path / f"{weight_sync.RECEIVED_PREFIX}{host}-{done.pid}-v3-abc.safetensors"
    live = tmp_path / f"{weight_sync.RECEIVED_PREFIX}{host}-{os.getpid()}-v3-def.safetensors"
    elsewhere = tmp_path / f"{weight_sync.RECEIVED_PREFIX}another.host-{done.pid}-v3-ghi.safetensors"
    for f in (dead, live, elsewhere):
        f.write_bytes(b"x")
    assert weight_sync.remove_stale_copies(str(tmp_path)) == [str(dead)]
    assert live.exists() and elsewhere.exists()
