"""GRPO objective of DeepSeek-V3.2 (paper section 3), as pure torch functions.

Notation (docs/EQUATIONS.md): q a prompt, o_1..o_G its G sampled responses, R_i their rewards,
pi_theta the policy being trained, pi_ref the frozen reference policy, and two "old" policies:
pi_samp, the data-sampling policy (the log-probs the inference engine reported at sampling time), and
pi_old, the policy the ratio and the KL's importance weight divide by (pi_samp itself, or the trainer's own
log-probs of the same tokens at the start of the step: `grpo.old_logprobs`, see below).

    A_i       = R_i - mean(R_1..R_G)                                   (group_advantages)
    r_{i,t}   = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})   (policy_ratio)
    KL_{i,t}  = r_{i,t} * (pi_ref/pi_theta - log(pi_ref/pi_theta) - 1)  (unbiased_kl)
    M_i       = 0 if A_i < 0 and (1/|o_i|) sum_t log(pi_samp/pi_theta) > delta, else 1
                                                                        (offpolicy_sequence_mask)
    J         = (1/N) sum_i (1/|o_i|) sum_t [min(r A_i, clip(r, 1-eps_low, 1+eps_high) A_i) M_i
                                             - beta KL_{i,t}]         (grpo_loss returns -J)

That J is the paper's (section 3.1): the off-policy mask multiplies the policy term only, so a masked
sequence is still pulled towards pi_ref. `grpo_loss(mask_kl=True)` multiplies the KL term by M_i too
(keel's earlier form), dropping a masked sequence from the loss entirely.

Which pi_old (the trainer's `grpo.old_logprobs`): "engine" takes pi_old = pi_samp. "trainer" takes the
trainer's own log-probs of the sampled tokens, computed once before the step's first update under the same
Keep Routing / Keep Sampling Mask; the mask still compares against pi_samp, as the paper says (it guards
against data from a policy far from pi_theta, whatever the cause). On CPU fp32 the two agree to ~1e-7 and
the choice does not matter. Where they differ (bf16 on GPU: another kernel, another reduction order), with
"engine" the ratio of the first update is pi_theta/pi_samp != 1, so the train/inference mismatch alone is
clipped and can zero a token's gradient before the policy has moved; with "trainer" the first update's
ratio is exactly 1 and clipping bounds only how far the policy moves within the step, as PPO intends;
the mismatch is then left uncorrected (no importance weight for it) and is bounded only by the mask.

Every function takes per-token log-probabilities of the *sampled* tokens (shape [N, T] where it
matters, padded; a response mask marks the counted tokens).

Keep Sampling Mask is applied upstream: where sampling truncated the vocabulary (top-k / top-p), the
trainer renormalises pi_theta and pi_ref over the same kept set before taking log-probs, so the
log-probs that reach this module already live on one action space shared by all three policies.
Keep Routing likewise happens in the model's forward pass; nothing here depends on either.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "clipped_surrogate",
    "grpo_loss",
    "group_advantages",
    "k3_kl",
    "offpolicy_sequence_mask",
    "policy_ratio",
    "unbiased_kl",
]

KLEstimator = Literal["unbiased", "k3", "none"]


def group_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = False, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages, one per response.

        A_i = R_i - mean(R_1..R_G)                           (default, as in DeepSeek-V3.2)
        A_i = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps)  (normalize_std=True)

    `rewards` is [N] with N = (number of prompts) * G, the G responses of one prompt in consecutive
    rows. std is the sample standard deviation (Bessel-corrected, like torch.std, TRL and verl), so
    normalize_std needs G >= 2. A group whose rewards are all equal gets A = 0 either way.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if normalize_std and group_size < 2:
        raise ValueError("normalize_std needs group_size >= 2")
    groups = rewards.reshape(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def policy_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """Importance ratio r_{i,t} = pi_theta(o_{i,t}) / pi_old(o_{i,t}) = exp(logp - old_logp)."""
    return torch.exp(logp - old_logp)


def clipped_surrogate(
    ratio: Tensor, advantages_per_token: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """Per-token PPO clipped surrogate (to be maximised).

        s_{i,t} = min(r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i)

    `advantages_per_token` broadcasts against `ratio` (e.g. A[:, None] against [N, T]). When the
    clipped branch is the minimum (r > 1+eps_high with A > 0, or r < 1-eps_low with A < 0) the
    token gives no gradient.
    """
    unclipped = ratio * advantages_per_token
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages_per_token
    return torch.minimum(unclipped, clipped)


def _k3_of_log_ratio(log_ref_over_theta: Tensor) -> Tensor:
    """x - log x - 1 at x = exp(d), computed as expm1(d) - d (no cancellation for small d)."""
    return torch.expm1(log_ref_over_theta) - log_ref_over_theta


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Plain K3 estimator of KL(pi_theta || pi_ref), per token.

        K3_{i,t} = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1

    Unbiased (and >= 0) only for tokens sampled from pi_theta itself; under samples from pi_old it
    is biased in both value and gradient. Kept for comparison; `unbiased_kl` replaces it.
    """
    return _k3_of_log_ratio(ref_logp - logp)


def unbiased_kl(logp: Tensor, old_logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Unbiased KL estimate of DeepSeek-V3.2, per token, for tokens sampled from pi_old.

        KL_{i,t} = (pi_theta/pi_old) * (pi_ref/pi_theta - log(pi_ref/pi_theta) - 1)

    The leading ratio is NOT detached: for o ~ pi_old,
        E[KL_{i,t}] = sum_o pi_theta(o) (pi_ref/pi_theta - log(pi_ref/pi_theta) - 1)
                    = KL(pi_theta || pi_ref),
    and since this holds for every theta, the expected gradient is grad KL(pi_theta || pi_ref) too.
    Computed in log space: exp(logp - old_logp) * (expm1(d) - d) with d = ref_logp - logp.
    """
    return policy_ratio(logp, old_logp) * k3_kl(logp, ref_logp)


def _sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(1/|o_i|) sum_t m_{i,t} x_{i,t}; padded entries are ignored even if nan; empty response gives 0."""
    counted = mask.bool()
    x = torch.where(counted, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(dim=-1) / counted.sum(dim=-1).clamp(min=1).to(x.dtype)


@torch.no_grad()
def offpolicy_sequence_mask(
    old_logp: Tensor, logp: Tensor, advantages_per_seq: Tensor, response_mask: Tensor, delta: float
) -> Tensor:
    """Off-policy sequence mask M_i (float 0/1, shape [N]), without gradient.

        M_i = 0  if A_i < 0 and (1/|o_i|) sum_t log(pi_samp(o_{i,t}) / pi_theta(o_{i,t})) > delta
        M_i = 1  otherwise

    old_logp here is pi_samp, the inference engine's sampling log-prob (grpo_loss passes its
    `sampling_logp`), so the divergence covers both policy staleness and train/inference mismatch.
    Positive- and zero-advantage sequences are never masked.
    """
    mask = response_mask.to(logp.dtype)
    divergence = _sequence_mean(old_logp.to(logp.dtype) - logp, mask)
    drop = (advantages_per_seq < 0) & (divergence > delta)
    return (~drop).to(logp.dtype)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 1e-3,
    kl_estimator: KLEstimator = "unbiased",
    offpolicy_delta: float | None = None,
    mask_kl: bool = False,
    sampling_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss to minimise, -J, and its metrics.

        J = (1/N) sum_i (1/|o_i|) sum_t m_{i,t} [ min(r A_i, clip(r, 1-eps_low, 1+eps_high) A_i) M_i
                                                 - beta KL_{i,t} (M_i if mask_kl) ]

    Shapes: logp, old_logp, ref_logp, sampling_logp, response_mask [N, T] (padded; m_{i,t} =
    response_mask, 1 on counted tokens); advantages [N]. |o_i| = sum_t m_{i,t}. N is the number of rows
    passed in (the mini-batch size when called per mini-batch); sequences dropped by M_i still count
    in 1/N. Only `logp` (pi_theta) carries gradient; old_logp, ref_logp, sampling_logp and advantages
    are detached.

    old_logp is pi_old of the ratio and of the unbiased KL's importance weight; sampling_logp is
    pi_samp, the data-sampling policy's log-probs, which the off-policy mask compares against (None:
    old_logp is pi_samp, keel's "engine" mode).

    mask_kl: False (the default, the paper's J): M_i multiplies the policy term only, a masked
    sequence keeps its KL pull towards pi_ref. True: M_i multiplies the KL term too, so a masked
    sequence leaves the loss entirely. That is useful when the masked sequences' log-probs are
    themselves suspect (a large train/inference mismatch: the unbiased KL's weight pi_theta/pi_old
    then rests on them too) and to reproduce runs made before the option existed.

    kl_estimator: "unbiased" (`unbiased_kl`, the default), "k3" (`k3_kl`) or "none" (beta KL term
    dropped; ref_logp may then be None). offpolicy_delta: None disables the mask (M_i = 1).

    Metrics (python floats, no grad; token averages run over all counted tokens, masked
    sequences included):
        loss, pg_loss (-(1/N) sum_i (1/|o_i|) sum_t M_i m s_{i,t}),
        kl (mean per-token KL estimate: the chosen estimator, the unbiased one for "none" when
            ref_logp is given, else 0), clip_frac (tokens where the clipped branch is active),
        masked_seq_frac (fraction of rows with M_i = 0), ratio_mean, ratio_max,
        logp_mismatch (mean |sampling_logp - logp|; the train/inference mismatch on the first forward).
    """
    if kl_estimator not in ("unbiased", "k3", "none"):
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}")
    if ref_logp is None and kl_estimator != "none":
        raise ValueError(f"kl_estimator={kl_estimator!r} needs ref_logp")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    counted = response_mask.bool()
    mask = counted.to(dtype)
    # Padded positions may hold anything (-inf, nan); zero them before any exp so neither the
    # value nor the gradient can pick up nan from them.
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    logp = torch.where(counted, logp.to(dtype), zero)
    old_logp = torch.where(counted, old_logp.detach().to(dtype), zero)
    sampling_logp = old_logp if sampling_logp is None else torch.where(counted, sampling_logp.detach().to(dtype), zero)
    if ref_logp is not None:
        ref_logp = torch.where(counted, ref_logp.detach().to(dtype), zero)
    advantages = advantages.detach().to(dtype)

    ratio = policy_ratio(logp, old_logp)
    adv_tok = advantages[:, None]
    surrogate = clipped_surrogate(ratio, adv_tok, clip_eps_low, clip_eps_high)

    if kl_estimator == "unbiased":
        kl = unbiased_kl(logp, old_logp, ref_logp)
    elif kl_estimator == "k3":
        kl = k3_kl(logp, ref_logp)
    else:
        kl = None

    if offpolicy_delta is None:
        seq_mask = torch.ones_like(advantages)
    else:
        seq_mask = offpolicy_sequence_mask(sampling_logp, logp, advantages, mask, offpolicy_delta)

    n = logp.shape[0]
    masked_weight = seq_mask[:, None] * mask  # M_i m_{i,t}
    lengths = mask.sum(dim=-1).clamp(min=1)  # |o_i| (masked sequences keep theirs, and their 1/N share)

    def batch_objective(x: Tensor, weight: Tensor) -> Tensor:
        """(1/N) sum_i (1/|o_i|) sum_t w_{i,t} x_{i,t}; w is M_i m_{i,t} or m_{i,t}. Uncounted x is 0 or
        finite here (padding was zeroed above), and where w = 0 the product is 0 in value and gradient."""
        return ((x * weight).sum(dim=-1) / lengths).sum() / max(n, 1)

    pg_loss = -batch_objective(surrogate, masked_weight)
    loss = pg_loss
    if kl is not None:
        loss = pg_loss + kl_coef * batch_objective(kl, masked_weight if mask_kl else mask)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)

        def token_mean(x: Tensor) -> float:
            return float((x * mask).sum() / n_tokens)

        if kl is not None:
            kl_metric = token_mean(kl)
        elif ref_logp is not None:
            kl_metric = token_mean(unbiased_kl(logp, old_logp, ref_logp))
        else:
            kl_metric = 0.0
        clipped = ((adv_tok > 0) & (ratio > 1.0 + clip_eps_high)) | (
            (adv_tok < 0) & (ratio < 1.0 - clip_eps_low)
        )
        metrics = {
            "loss": float(loss),
            "pg_loss": float(pg_loss),
            "kl": kl_metric,
            "clip_frac": token_mean(clipped.to(dtype)),
            "masked_seq_frac": float((seq_mask == 0).to(dtype).mean()) if n > 0 else 0.0,
            "ratio_mean": token_mean(ratio),
            "ratio_max": float(ratio[counted].max()) if counted.any() else 0.0,
            "logp_mismatch": token_mean((sampling_logp - logp).abs()),
        }
    return loss, metrics
