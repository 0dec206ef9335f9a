"""Train-inference mismatch: how far the trainer's recomputation of a rollout is from what the engine did.

Pure measures on the two records of the same tokens (the engine's routing, kept sets and log-probs, and the
trainer's own): logged every GRPO step by the trainer (trainer/worker.py) and probed by the stabiliser ablation
(rl/loop/metrics.py `mismatch_probe`, bench/ablation.py).
"""

from __future__ import annotations

import torch


def routing_agreement_per_layer(engine: torch.Tensor, trainer: torch.Tensor) -> torch.Tensor:
    """Per MoE layer l, the fraction of tokens whose expert set is the same in both records:

        agree_l = (1/M) sum_m [ sort(E_engine[m, l]) == sort(E_trainer[m, l]) ]

    engine, trainer: [M, L, k] expert ids of M counted tokens (the order within a token's top-k carries no
    meaning, so sets are compared). Returns [L] floats; the trainer's `routing_agreement` is their mean."""
    if engine.shape != trainer.shape or engine.dim() != 3:
        raise ValueError(f"routing records of shapes {tuple(engine.shape)} and {tuple(trainer.shape)}: expected "
                         "two [tokens, layers, top_k]")
    same = (engine.sort(-1).values == trainer.sort(-1).values).all(-1)
    return same.float().mean(0) if len(same) else torch.ones(engine.shape[1])


def kept_sets(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The tokens a top-k / top-p sampler keeps, as a bool mask [M, V] over logits [M, V] (already divided by
    the temperature). vLLM's rule: top-k first, then, in ascending probability order p_(1) <= ... <= p_(K),
    drop the tokens with p_(1) + ... + p_(j) <= 1 - top_p (the most probable token is always kept)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    if 0 < top_k < logits.shape[-1]:
        keep &= logits >= logits.topk(top_k, dim=-1).values[..., -1:]
    if top_p < 1.0:
        masked = logits.masked_fill(~keep, float("-inf"))
        probs, order = masked.softmax(-1).sort(-1)
        drop = probs.cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        keep &= ~torch.zeros_like(drop).scatter(-1, order, drop)
    return keep


def kept_set_disagreement(engine_kept: torch.Tensor, trainer_keep: torch.Tensor) -> float:
    """The fraction of positions whose kept set differs: engine_kept [M, K] the engine's kept ids (-1 padded),
    trainer_keep [M, V] the trainer's own kept set as a mask (`kept_sets`)."""
    vocab = trainer_keep.shape[-1]
    # Padding goes to an extra column, dropped after: scattered onto a real id it could clear that id's mark.
    engine_keep = torch.zeros(*trainer_keep.shape[:-1], vocab + 1, dtype=torch.bool)
    engine_keep.scatter_(-1, torch.where(engine_kept >= 0, engine_kept, vocab), True)
    engine_keep = engine_keep[..., :vocab]
    return (engine_keep != trainer_keep).any(-1).float().mean().item() if len(engine_kept) else 0.0


def logp_mismatch_distribution(engine_logp: torch.Tensor, trainer_logp: torch.Tensor) -> dict[str, float]:
    """|log pi_samp(y_t) - log pi_theta(y_t)| over the counted tokens (1-D tensors): mean, quantiles, max; and the
    train-inference KL of the sampler from the trainer, estimated on the sampled tokens (y_t ~ pi_samp):

        kl_k1 = mean_t (log pi_samp - log pi_theta)                     (unbiased for KL(pi_samp || pi_theta))
        kl_k3 = mean_t (r - 1 - log r),  r = pi_theta / pi_samp         (unbiased too, and never negative)
    """
    if engine_logp.numel() == 0:
        return dict.fromkeys(("mean", "p50", "p90", "p99", "max", "kl_k1", "kl_k3"), 0.0)
    diff = (engine_logp - trainer_logp).double()
    gap = diff.abs()
    q = torch.quantile(gap, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    log_r = -diff
    return {"mean": gap.mean().item(), "p50": q[0].item(), "p90": q[1].item(), "p99": q[2].item(),
            "max": gap.max().item(), "kl_k1": diff.mean().item(), "kl_k3": (log_r.exp() - 1 - log_r).mean().item()}


def offpolicy_fraction(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor,
                       delta: float) -> float:
    """The fraction of sequences the off-policy mask would drop were their advantage negative:

        (1/N) sum_i [ (1/|o_i|) sum_t (log pi_samp - log pi_theta)(o_{i,t}) > delta ]

    engine_logp, trainer_logp, mask: [N, T] (mask 1 on counted tokens)."""
    counted = mask.sum(-1)
    gap = ((engine_logp - trainer_logp) * mask).sum(-1) / counted.clamp(min=1)
    rows = counted > 0
    return (gap[rows] > delta).float().mean().item() if rows.any() else 0.0


def step_mismatch(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, engine_routing: torch.Tensor | None = None,
                  trainer_routing: torch.Tensor | None = None) -> dict[str, float]:
    """A GRPO step's mismatch metrics, from the counted tokens' log-probs (1-D) and, when recorded, the fed tokens'
    routing ([M, L, k] each): `logp_mismatch_first` (the mean |gap|), `mismatch/logp_{p50,p90,p99,max,kl_k1,kl_k3}`,
    `routing_agreement` (the mean over MoE layers; nan without routing) and `mismatch/routing_layer_{l}`."""
    gap = logp_mismatch_distribution(engine_logp, trainer_logp)
    metrics = {"logp_mismatch_first": gap.pop("mean"), **{f"mismatch/logp_{k}": v for k, v in gap.items()}}
    metrics["routing_agreement"] = float("nan")
    if engine_routing is not None and trainer_routing is not None:
        layers = routing_agreement_per_layer(engine_routing, trainer_routing).tolist()
        metrics["routing_agreement"] = sum(layers) / len(layers)
        metrics.update({f"mismatch/routing_layer_{i}": a for i, a in enumerate(layers)})
    return metrics
