"""The trainer's GRPO objective on one mini-batch: model forward under Keep Routing, log-probs under Keep
Sampling Mask, the clipped ratio loss with KL and off-policy masking, plus the indexer's KL loss.

Pure given its inputs (no DeepSpeed, no Ray), so tests call it on a bare model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rl.algo.grpo import grpo_loss
from rl.algo.logprobs import token_logprobs
from rl.model.transformer import ModelOutput
from trainer.batching import TrainTensors


def policy_logprobs(
    forward: Callable[..., ModelOutput],
    head_weight: torch.Tensor,
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
    head_weight: torch.Tensor,
    mb: TrainTensors,
    ref_logp: torch.Tensor | None,
    options: dict,
    train_indexer: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to minimise on one mini-batch and its metrics.

    options: the `grpo` config section (+ `temperature`). With keep_routing off the model routes freely;
    with keep_sampling_mask off `mb.kept_ids` should be None (trainer.batching does that).
    """
    routing = mb.routing if options["keep_routing"] else None
    valid = (mb.targets != 0) | (mb.response_mask > 0)
    logp, _, out = policy_logprobs(
        forward, head_weight, mb, routing, options["temperature"], options["logprob_chunk"],
        indexer_loss=train_indexer, query_mask=valid,
    )
    loss, metrics = grpo_loss(
        logp, mb.old_logp, ref_logp, mb.advantages, mb.response_mask,
        clip_eps_low=options["clip_eps_low"], clip_eps_high=options["clip_eps_high"],
        kl_coef=options["kl_coef"], kl_estimator=options["kl_estimator"], offpolicy_delta=options["offpolicy_delta"],
    )
    if out.indexer_loss is not None:
        # Disjoint gradients: the indexer sees detached inputs, so this term trains only the indexer.
        loss = loss + options["indexer_loss_coef"] * out.indexer_loss
        metrics["indexer_kl"] = out.indexer_loss.item()
    return loss, metrics
