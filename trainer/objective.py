"""The trainer's objectives, pure given their inputs (no DeepSpeed, no Ray), so tests call them on a bare model.

- `grpo_objective`: one GRPO mini-batch: model forward under Keep Routing, log-probs under Keep Sampling
  Mask, the clipped ratio loss with KL and off-policy masking, plus the indexer's KL loss.
- `lm_objective`: next-token loss with a loss kind (`LOSSES`): supervised fine-tuning and pretraining, and
  the two stages of the lightning indexer's warm-up (DeepSeek-V3.2 section 2.1.1).
- `held_out_loss`: the mean next-token loss of a model on held-out ids, dense or DSA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rl.algo.config import GRPOConfig
from rl.algo.grpo import grpo_loss
from rl.algo.logprobs import token_logprobs
from rl.model.transformer import ModelOutput, Transformer
from trainer.batching import TrainTensors

# Loss kinds of `lm_objective` (TrainerWorker.train_step):
#   lm                next-token cross-entropy on loss_mask positions, the model's own attention (SFT, pretraining)
#   indexer_dense     dense attention; the loss is the indexer's KL to the head-summed attention over all causal
#                     tokens (warm-up stage 1: only the indexer trains); the LM loss is reported, not trained
#   lm_sparse_indexer top-k attention; LM loss + indexer_loss_coef * the indexer's KL on the selected tokens
#                     (warm-up stage 2; the indexer's input is detached, so the two gradients are disjoint)
#   lm_dense_indexer  dense attention; LM loss + indexer_loss_coef * the indexer's KL to the dense attention: a
#                     warm start that trains the model and its indexer together, before RL in the sparse regime
LOSSES = ("lm", "indexer_dense", "lm_sparse_indexer", "lm_dense_indexer")


def policy_logprobs(
    forward: Callable[..., ModelOutput],
    head_weight: torch.Tensor | torch.nn.Module,
    data: TrainTensors,
    routing: torch.Tensor | None,
    temperature: float,
    chunk_size: int = 1024,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, ModelOutput]:
    """log pi(y_t) at every position (temperature-scaled, renormalised over kept sets), entropy, model output.

    `routing` forces the recorded experts (Keep Routing) or is None; `data.kept_ids` restricts pi to the
    kept sets (Keep Sampling Mask) or is None.
    """
    out = forward(data.input_ids, routing=routing, **forward_kwargs)
    logp, entropy = token_logprobs(
        out.hidden, head_weight, data.targets, data.kept_ids, temperature=temperature, chunk_size=chunk_size
    )
    return logp, entropy, out


def grpo_objective(
    forward: Callable[..., ModelOutput],
    head_weight: torch.Tensor | torch.nn.Module,
    mb: TrainTensors,
    ref_logp: torch.Tensor | None,
    options: GRPOConfig,
    temperature: float,
    train_indexer: bool,
    old_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to minimise on one mini-batch and its metrics.

    options: the `grpo` config section; temperature: the rollout's sampling temperature. With keep_routing
    off the model routes freely; with keep_sampling_mask off `mb.kept_ids` should be None (trainer.batching
    does that). old_logp: pi_old of the ratio and the KL when it is not the engine's (`grpo.old_logprobs:
    trainer`: the trainer's own log-probs at the start of the step); the off-policy mask always compares
    against the engine's, `mb.old_logp`. None: the engine's for both.
    """
    routing = mb.routing if options.keep_routing else None
    valid = (mb.targets != 0) | (mb.response_mask > 0)
    logp, _, out = policy_logprobs(
        forward, head_weight, mb, routing, temperature, options.logprob_chunk,
        indexer_loss=train_indexer, query_mask=valid,
        index_selection=mb.index_selection if options.keep_indexer_selection else None,
    )
    loss, metrics = grpo_loss(
        logp, mb.old_logp if old_logp is None else old_logp, ref_logp, mb.advantages, mb.response_mask,
        clip_eps_low=options.clip_eps_low, clip_eps_high=options.clip_eps_high,
        kl_coef=options.kl_coef, kl_estimator=options.kl_estimator, offpolicy_delta=options.offpolicy_delta,
        mask_kl=options.mask_kl, sampling_logp=mb.old_logp,
    )
    if out.indexer_loss is not None:
        # Disjoint gradients: the indexer sees detached inputs, so this term trains only the indexer.
        loss = loss + options.indexer_loss_coef * out.indexer_loss
        metrics["indexer_kl"] = out.indexer_loss.item()
    return loss, metrics


def masked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor | torch.nn.Module, targets: torch.Tensor,
                   loss_mask: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Mean next-token negative log-likelihood of targets [B, T] over loss_mask (None: every position)."""
    logp, _ = token_logprobs(hidden, head_weight, targets, chunk_size=chunk_size)
    if loss_mask is None:
        return -logp.mean()
    return -(logp * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def lm_objective(
    forward: Callable[..., ModelOutput],
    model: Transformer,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    kind: str,
    indexer_loss_coef: float = 1.0,
    chunk_size: int = 1024,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to minimise, metrics) of one batch for a loss kind of `LOSSES`; `forward` is the model or its
    DeepSpeed engine, `model` the bare module (its lm_head)."""
    head = model.lm_head  # called as a module: ZeRO-3 gathers its weight (rl.algo.logprobs)
    if kind == "lm":
        out = forward(input_ids, segment_ids=segment_ids)
        loss = masked_lm_loss(out.hidden, head, targets, loss_mask, chunk_size)
        return loss, {"lm_loss": loss.item()}
    if kind == "indexer_dense":
        out = forward(input_ids, sparse=False, indexer_loss=True, segment_ids=segment_ids)
        with torch.no_grad():
            lm = masked_lm_loss(out.hidden, head, targets, loss_mask, chunk_size)
        return out.indexer_loss, {"indexer_kl": out.indexer_loss.item(), "lm_loss": lm.item()}
    if kind in ("lm_sparse_indexer", "lm_dense_indexer"):
        out = forward(input_ids, sparse=kind == "lm_sparse_indexer", indexer_loss=True, segment_ids=segment_ids)
        lm = masked_lm_loss(out.hidden, head, targets, loss_mask, chunk_size)
        loss = lm + indexer_loss_coef * out.indexer_loss
        return loss, {"indexer_kl": out.indexer_loss.item(), "lm_loss": lm.item()}
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSSES}")


@torch.no_grad()
def held_out_loss(model: Transformer, ids: torch.Tensor, sparse: bool, batch_size: int = 16) -> float:
    """Mean held-out LM loss (nats per token) of `model` on ids [N, T + 1], with or without top-k attention."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        out = model(chunk[:, :-1], sparse=sparse)
        total += masked_lm_loss(out.hidden, model.lm_head, chunk[:, 1:]).item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count
