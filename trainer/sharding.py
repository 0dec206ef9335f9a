"""How the trainer's model is spread over its ranks by DeepSpeed ZeRO, and how whole weights come back out.

ZeRO-1 shards the optimiser states over the data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3 the
parameters as well: a rank holds 1/N of each parameter and DeepSpeed gathers a whole one only for the forward
(and backward) of the module that owns it. The model is written for that (rl.model.transformer reads every
weight inside its own module's forward; rl.algo.logprobs calls the lm_head module). Two more things here:

- MoE layers are ZeRO-3 *leaf* modules: one gather fetches the gate and every expert of a layer. Ranks route
  their rows to different experts, and without grad an unrouted expert is skipped; gathers are collectives,
  so per-expert gathers would differ between ranks and hang. As a leaf the layer's gathers are the same on
  every rank whatever the routing.
- The lightning indexer, when it trains with its own optimiser (trainer.indexer_optim: its own clip, outside
  DeepSpeed's), is sharded like the rest; that optimiser keeps whole fp32 masters of it on every rank (it is
  ~0.1% of DeepSeek-V3.2's parameters; docs/SCALING.md counts its bytes) and writes each step back through
  DeepSpeed's GatheredParameters.

`weight_buckets` streams the whole weights in HF names, gathered one bucket at a time under ZeRO-3 (every rank
must iterate it: a gather is a collective). bench/trainer_memory.py counts what a rank holds at each stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import struct
import tempfile
import uuid
from collections.abc import Iterator

import torch
from torch import nn

import rollout.weight_sync as weight_sync  # the receiving contract: what a published weight version is
from rl.model.transformer import MoE, Transformer


def deepspeed_config(zero_stage: int, micro_batch: int, world_size: int, grad_clip: float, bf16: bool) -> dict:
    """The engine's config. Under ZeRO-3 every parameter is sharded (no size below which DeepSpeed keeps one
    whole on every rank: what a rank holds is then exactly 1/N of each, which the tests and the bench check)."""
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
    }


def initialize(model: Transformer, optimizer: torch.optim.Optimizer, config: dict):
    """deepspeed.initialize -> (engine, optimizer); under ZeRO-3 MoE layers are leaf modules (module docstring)."""
    import deepspeed

    if config["zero_optimization"]["stage"] == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [MoE])
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, opt


def is_sharded(p: torch.Tensor) -> bool:
    """Whether `p` is a ZeRO-3 parameter (DeepSpeed marks those with a ds_id)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if is_sharded(p) else p.numel()


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({name: parameter or buffer}, the names in state_dict order)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return tensors, [n for n in model.state_dict(keep_vars=True) if n in tensors]


def weight_buckets(model: nn.Module, bucket_bytes: int, keep: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's whole state (HF names, state_dict order) in buckets of at most `bucket_bytes` (fp32; a bigger
    tensor is a bucket of its own): the tensors themselves where `keep` (rank 0), empty lists elsewhere. Sharded
    parameters are gathered one bucket at a time, so a rank never holds more than one bucket beyond its shard;
    a bucket's tensors are valid until the next one is asked for (copy what is kept). Every rank must run the
    iteration to its end together (each gather is a collective)."""
    import deepspeed

    tensors, names = _state(model)
    bucket, size = [], 0
    for i, name in enumerate(names):
        bucket.append(name)
        size += 4 * full_numel(tensors[name])
        nxt = names[i + 1] if i + 1 < len(names) else None
        if nxt is not None and size + 4 * full_numel(tensors[nxt]) <= bucket_bytes:
            continue
        sharded = [tensors[n] for n in bucket if is_sharded(tensors[n])]
        with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None, enabled=bool(sharded)):
            yield [(n, tensors[n].detach()) for n in bucket] if keep else []  # valid until the next bucket
        bucket, size = [], 0


def full_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """[(name, whole shape)] of the model's state in state_dict order (what `weight_buckets` yields), read from
    ZeRO-3's metadata without a gather."""
    tensors, names = _state(model)
    return [(n, tuple(tensors[n].ds_shape if is_sharded(tensors[n]) else tensors[n].shape)) for n in names]


def weight_stream(model: nn.Module, dtype: torch.dtype, bucket_bytes: int) -> weight_sync.BucketStream:
    """Rank 0's weights as the CUDA weight sync streams them (`weight_sync.BucketStream`): `weight_buckets` cast to
    the wire dtype; under ZeRO-3 every other rank runs `follow_weight_stream` at the same time."""
    return weight_sync.BucketStream(lambda: full_shapes(model), lambda: weight_buckets(model, bucket_bytes, True),
                                    dtype)


def follow_weight_stream(model: nn.Module, bucket_bytes: int) -> None:
    """A rank other than 0 under ZeRO-3, while rank 0 sends a `weight_stream`: the same gathers, nothing kept."""
    for _ in weight_buckets(model, bucket_bytes, keep=False):
        pass


def gathered_state(model: nn.Module, keep: bool, bucket_bytes: int = 256 << 20) -> dict[str, torch.Tensor] | None:
    """The whole state as one {name: fp32 CPU tensor} on the rank that `keep`s it (None elsewhere); every rank
    must call it together under ZeRO-3."""
    state = {n: t.to("cpu", torch.float32).clone() for bucket in weight_buckets(model, bucket_bytes, keep)
             for n, t in bucket}
    return state if keep else None


def write_safetensors(model: nn.Module, path: str | None, bucket_bytes: int = 256 << 20) -> dict[str, tuple]:
    """The whole state as one fp32 safetensors file at `path`, written bucket by bucket: names, shapes and offsets
    are known before any gather, so the header goes first and the writer never holds more than one bucket.
    Every rank calls it together (the gathers); only the one with a `path` writes. Returns {name: shape}."""
    shapes = dict(full_shapes(model))
    names = list(shapes)
    out = None
    if path is not None:
        header, offset = {}, 0
        for n in names:
            size = 4 * math.prod(shapes[n])
            header[n] = {"dtype": "F32", "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        out = open(path, "wb")  # noqa: SIM115 - closed below, after the last bucket
        out.write(struct.pack("<Q", len(raw)) + raw)
    try:
        for bucket in weight_buckets(model, bucket_bytes, keep=out is not None):
            for _, t in bucket:  # written from the (gathered) parameter itself: no copy of an fp32 CPU one
                out.write(t.to("cpu", torch.float32).contiguous().numpy().data)
    finally:
        if out is not None:
            out.close()
    return shapes


def publish(model: nn.Module, version: int, file: bool, blob: bool, node: str | None) -> weight_sync.WeightHandle:
    """Rank 0's half of TrainerWorker.publish_weights: the file under /dev/shm written by `write_safetensors`
    (the other ranks call that with no path), the blob put from the file's pages; a blob-only version's file
    is removed once put. Returns the handle."""
    if not (file or blob):
        raise ValueError("publish_weights needs a file, a blob or both")
    folder = tempfile.mkdtemp(prefix="keel-weights-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = os.path.join(folder, f"v{version}-{uuid.uuid4().hex[:8]}.safetensors")
    shapes = write_safetensors(model, path)
    ref = None
    if blob:
        import numpy as np
        import ray

        ref = ray.put(np.memmap(path, dtype=np.uint8, mode="r"))
    handle = weight_sync.WeightHandle(path=path, version=version, host=socket.gethostname(), shapes=shapes,
                                      blob=ref, node=node)
    if not file:
        weight_sync.release_weights(handle)
        handle = dataclasses.replace(handle, path="")
    return handle
