"""RolloutBatch (pyarrow) -> padded training tensors, one row per response.

For a response o to prompt q the model is fed x = (q + o)[:-1] and predicts y = (q + o)[1:]; the response
tokens are y[|q|-1:]. The recorded routing covers exactly the fed tokens x, and the kept sets and engine
log-probs are placed at the response positions of y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from rl.algo.batch import indexer_topk_of, routing_of


@dataclass
class TrainTensors:
    input_ids: torch.Tensor  # [N, T] right-padded with 0
    targets: torch.Tensor  # [N, T]
    response_mask: torch.Tensor  # [N, T] float, 1 on trained response tokens
    old_logp: torch.Tensor  # [N, T] engine log-probs at response tokens, 0 elsewhere
    advantages: torch.Tensor  # [N]
    routing: torch.Tensor | None  # [N, T, moe_layers, top_k] int64 recorded expert ids
    kept_ids: torch.Tensor | None  # [N, T, K] kept token ids, -1 padded (all -1: not truncated)
    # [N, T, dsa_layers, index_topk] the engine's indexer selections (-1 in unused slots), when recorded
    index_selection: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> TrainTensors:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TrainTensors(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


def to_train_tensors(batch: pa.RecordBatch | pa.Table, top_k: int, with_routing: bool, with_mask: bool,
                     with_index_selection: bool = False) -> TrainTensors:
    n = batch.num_rows
    prompts = batch.column("prompt_ids").to_pylist()
    responses = batch.column("response_ids").to_pylist()
    old = batch.column("rollout_logprobs").to_pylist()
    loss_masks = batch.column("loss_mask").to_pylist()
    lengths = [len(p) + len(r) - 1 for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)

    input_ids = torch.zeros(n, width, dtype=torch.long)
    targets = torch.zeros(n, width, dtype=torch.long)
    response_mask = torch.zeros(n, width)
    old_logp = torch.zeros(n, width)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq = torch.tensor(p + r, dtype=torch.long)
        input_ids[i, : lengths[i]] = seq[:-1]
        targets[i, : lengths[i]] = seq[1:]
        start = len(p) - 1
        mask = torch.ones(len(r)) if loss_masks[i] is None else torch.tensor(loss_masks[i], dtype=torch.float32)
        response_mask[i, start : start + len(r)] = mask
        old_logp[i, start : start + len(r)] = torch.tensor(old[i], dtype=torch.float32)

    routing = None
    if with_routing:
        moe_layers = int(batch.schema.metadata[b"moe_layers"])
        # Padding positions get experts 0..k-1: they feed nothing that is trained (causal attention).
        routing = torch.arange(top_k).expand(n, width, moe_layers, top_k).clone()
        for i in range(n):
            rec = routing_of(batch, i)
            if rec is None:
                raise ValueError(f"row {i} has no routed_experts but grpo.keep_routing is on")
            if rec.shape[0] != lengths[i]:
                raise ValueError(
                    f"row {i}: routing covers {rec.shape[0]} tokens, expected {lengths[i]} (prompt+response-1)"
                )
            routing[i, : lengths[i]] = torch.from_numpy(rec.astype(np.int64))

    kept_ids = None
    masks = batch.column("sampling_mask").to_pylist()
    if with_mask and any(m is not None for m in masks):
        kmax = max(len(s) for m in masks if m is not None for s in m)
        kept_ids = torch.full((n, width, kmax), -1, dtype=torch.long)
        for i, m in enumerate(masks):
            if m is None:
                continue
            start = len(prompts[i]) - 1
            for j, kept in enumerate(m):
                kept_ids[i, start + j, : len(kept)] = torch.tensor(kept, dtype=torch.long)

    advantages = torch.tensor(batch.column("advantage").to_pylist(), dtype=torch.float32)
    selection = index_selection(batch, lengths, width) if with_index_selection else None
    return TrainTensors(input_ids, targets, response_mask, old_logp, advantages, routing, kept_ids, selection)


def index_selection(batch: pa.RecordBatch | pa.Table, lengths: list[int], width: int) -> torch.Tensor | None:
    """[N, width, dsa_layers, K] positions each DSA layer attended to, from the recorded `indexer_topk`, or
    None when the batch holds no selection to replay (no row longer than index_topk, or none recorded).

    A token at position t < K attends to every earlier token (0..t, -1 after); from K on, the engine's record.
    Padding positions get the K latest positions, a valid set whose output is never trained (a set of only
    -1 would make their softmax NaN, and NaN * 0 is still NaN in the loss).
    """
    meta = batch.schema.metadata or {}
    layers, k = int(meta.get(b"dsa_layers", 0)), int(meta.get(b"index_topk", 0))
    if not layers or width <= k:
        return None
    t = torch.arange(width)[:, None]
    recent = t - torch.arange(k)[None, :]  # [width, K]: t, t-1, ..., t-K+1
    out = recent.masked_fill(recent < 0, -1)[None, :, None, :].repeat(batch.num_rows, 1, layers, 1)
    for i, n in enumerate(lengths):
        if n <= k:
            continue
        rec = indexer_topk_of(batch, i)
        if rec is None:
            raise ValueError(f"row {i} ({n} fed tokens > index_topk {k}) has no indexer_topk recorded but "
                             "grpo.keep_indexer_selection is on: set rollout.engine.capture_indexer=true (CPU "
                             "engines record it; vLLM on CUDA has no indexer-selection return yet, so there set "
                             "grpo.keep_indexer_selection=false)")
        if rec.shape[0] != n - k:
            raise ValueError(f"row {i}: indexer_topk covers {rec.shape[0]} tokens, expected {n - k} "
                             f"(prompt+response-1 minus index_topk)")
        out[i, k:n] = torch.from_numpy(rec)
    return out
