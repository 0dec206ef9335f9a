"""Tests for rl/algo/grpo.py: hand-computed cases, a Monte-Carlo check of the unbiased KL, and grpo_loss
against a direct loop over the formula in docs/EQUATIONS.md."""

from __future__ import annotations

import math

import pytest
import torch

from rl.algo.grpo import (
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    offpolicy_sequence_mask,
    policy_ratio,
    unbiased_kl,
)

F64 = torch.float64
LN2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ----------------------------------------------------------------------------- group_advantages


def test_group_advantages_mean_only() -> None:
    # groups (1, 0) and (0, 1): means 0.5 -> A = R - 0.5
    torch.testing.assert_close(group_advantages(t(1, 0, 0, 1), 2), t(0.5, -0.5, -0.5, 0.5))
    # G=4: group (1,0,0,0) mean 0.25; group (1,1,1,1) mean 1 -> all zero
    torch.testing.assert_close(
        group_advantages(t(1, 0, 0, 0, 1, 1, 1, 1), 4), t(0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0)
    )


def test_group_advantages_std_normalised() -> None:
    # group (1, 0): mean 0.5, sample std sqrt((0.25 + 0.25) / 1) = 1/sqrt(2) -> A = +-0.5*sqrt(2)
    s = 0.5 * math.sqrt(2.0)
    out = group_advantages(t(1, 0, 0, 1), 2, normalize_std=True, eps=0.0)
    torch.testing.assert_close(out, t(s, -s, -s, s))
    # group (3, 1, 2): mean 2, sample std 1 -> A = (1, -1, 0) / (1 + eps)
    out = group_advantages(t(3, 1, 2), 3, normalize_std=True, eps=1e-6)
    torch.testing.assert_close(out, t(1, -1, 0) / (1 + 1e-6))
    # a constant group gives 0, not nan
    out = group_advantages(t(2, 2, 5, 1), 2, normalize_std=True)
    assert out[:2].tolist() == [0.0, 0.0]


def test_group_advantages_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        group_advantages(t(1, 0, 1), 2)
    with pytest.raises(ValueError):
        group_advantages(t(1, 0), 1, normalize_std=True)


# ----------------------------------------------------------------------------- ratio and surrogate


def test_policy_ratio() -> None:
    # pi_theta = 0.5, pi_old = 0.25 -> 2;  pi_theta = 0.1, pi_old = 0.4 -> 0.25
    out = policy_ratio(torch.log(t(0.5, 0.1)), torch.log(t(0.25, 0.4)))
    torch.testing.assert_close(out, t(2.0, 0.25))


def test_clipped_surrogate_positive_advantage() -> None:
    # A = +1, eps = 0.2: r=1.5 clipped to 1.2; r=0.5 stays (min picks r A); r=1.1 inside the band
    ratio = t(1.5, 0.5, 1.1).requires_grad_()
    s = clipped_surrogate(ratio, t(1.0), 0.2, 0.2)
    torch.testing.assert_close(s, t(1.2, 0.5, 1.1))
    s.sum().backward()
    torch.testing.assert_close(ratio.grad, t(0.0, 1.0, 1.0))  # clipped token gives no gradient


def test_clipped_surrogate_negative_advantage() -> None:
    # A = -2, eps = 0.2: r=0.5 -> min(-1.0, 0.8 * -2 = -1.6) = -1.6 (clipped);
    # r=1.5 -> min(-3.0, 1.2 * -2 = -2.4) = -3.0 (unclipped, keeps gradient)
    ratio = t(0.5, 1.5, 0.9).requires_grad_()
    s = clipped_surrogate(ratio, t(-2.0), 0.2, 0.2)
    torch.testing.assert_close(s, t(-1.6, -3.0, -1.8))
    s.sum().backward()
    torch.testing.assert_close(ratio.grad, t(0.0, -2.0, -2.0))


def test_clipped_surrogate_asymmetric_eps() -> None:
    # eps_low = 0.1, eps_high = 0.28 (clip-higher): band [0.9, 1.28]
    s = clipped_surrogate(t(1.5, 0.5), t(1.0, -1.0), 0.1, 0.28)
    torch.testing.assert_close(s, t(1.28, -0.9))


# ----------------------------------------------------------------------------- KL estimators


def test_k3_and_unbiased_kl_hand_values() -> None:
    # pi_theta = 0.5, pi_old = 0.25, pi_ref = 0.25:
    #   pi_ref/pi_theta = 0.5 -> K3 = 0.5 - log 0.5 - 1 = ln2 - 0.5 = 0.1931472
    #   ratio = 2 -> unbiased = 2 * K3 = 2 ln2 - 1 = 0.3862944
    logp = torch.log(t(0.5)).requires_grad_()
    old, ref = torch.log(t(0.25)), torch.log(t(0.25))
    torch.testing.assert_close(k3_kl(logp, ref), t(LN2 - 0.5))
    kl = unbiased_kl(logp, old, ref)
    torch.testing.assert_close(kl, t(2 * LN2 - 1))
    # KL = e^{ref-old} - r (d + 1), d = ref - logp, so dKL/dlogp = -r d = 2 ln2.
    # A detached ratio would give r (1 - pi_ref/pi_theta) = 1 instead.
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, t(2 * LN2))


def test_kl_estimators_zero_at_reference_and_equal_on_policy() -> None:
    logp = torch.log(t(0.3, 0.6))
    assert k3_kl(logp, logp).abs().max() == 0
    assert unbiased_kl(logp, torch.log(t(0.1, 0.9)), logp).abs().max() == 0
    # on-policy (pi_old = pi_theta) the ratio is 1 and the two estimators coincide
    ref = torch.log(t(0.05, 0.9))
    torch.testing.assert_close(unbiased_kl(logp, logp, ref), k3_kl(logp, ref))


def test_kl_stable_for_tiny_and_large_log_ratios() -> None:
    # d = 1e-9: x - log x - 1 ~ d^2 / 2 = 5e-19, which the naive form loses to cancellation
    logp = t(-1.0)
    out = k3_kl(logp, logp + 1e-9)
    torch.testing.assert_close(out, t(5e-19), rtol=1e-6, atol=0.0)
    assert torch.isfinite(unbiased_kl(t(-30.0), t(-0.01), t(-0.02))).all()


def test_k3_gradient_weight_is_unbounded_where_pi_theta_falls_below_pi_ref() -> None:
    """The per-token pull of each estimator on log pi_theta, by autograd against the closed forms, for a token
    sampled on policy (pi_old = pi_theta) that pi_ref gives 0.5:
    K3: 1 - pi_ref/pi_theta, which grows without bound as pi_theta -> 0 (DeepSeek-V3.2's reason to replace it);
    unbiased: (pi_theta/pi_old) log(pi_theta/pi_ref) = log(pi_theta/pi_ref), only logarithmic."""
    ref = torch.log(t(0.5))
    for p in (1e-2, 1e-4, 1e-6):
        logp = torch.log(t(p)).requires_grad_()
        (g_k3,) = torch.autograd.grad(k3_kl(logp, ref), logp)
        (g_unbiased,) = torch.autograd.grad(unbiased_kl(logp, logp.detach(), ref), logp)
        torch.testing.assert_close(g_k3, t(1 - 0.5 / p))
        torch.testing.assert_close(g_unbiased, t(math.log(p / 0.5)))
    assert abs(g_k3.item()) > 4e5 and abs(g_unbiased.item()) < 14  # at pi_theta = 1e-6


def test_unbiased_kl_monte_carlo_value_and_gradient() -> None:
    """Under o ~ pi_old, mean(unbiased_kl) -> KL(pi_theta||pi_ref) in value and gradient; K3 does not."""
    gen = torch.Generator().manual_seed(0)
    old_logits = t(1.0, -0.5, 1.0, -0.5, 0.0, 0.5)
    theta = t(-0.4, 0.6, 0.2, 0.9, -0.2, -0.8).requires_grad_()
    ref_logits = t(0.1, 0.0, -0.5, 0.4, 0.7, -0.3)
    log_old = torch.log_softmax(old_logits, -1)
    log_ref = torch.log_softmax(ref_logits, -1)

    def log_theta() -> torch.Tensor:
        return torch.log_softmax(theta, -1)

    # exact KL(pi_theta || pi_ref) and its gradient, by autograd on the closed form
    lt = log_theta()
    exact_kl = (lt.exp() * (lt - log_ref)).sum()
    (exact_grad,) = torch.autograd.grad(exact_kl, theta)
    assert exact_kl > 0.1 and exact_grad.abs().max() > 0.05  # the comparison is not vacuous

    n = 200_000
    samples = torch.multinomial(log_old.exp(), n, replacement=True, generator=gen)

    def estimate(estimator: str) -> torch.Tensor:
        lt = log_theta()
        if estimator == "unbiased":
            return unbiased_kl(lt[samples], log_old[samples], log_ref[samples])
        return k3_kl(lt[samples], log_ref[samples])

    def per_action_grads(estimator: str) -> torch.Tensor:
        """[6, 6]: row a = gradient w.r.t. theta of the estimator at action a (per-sample gradients)."""
        rows = []
        for a in range(6):
            lt = log_theta()
            if estimator == "unbiased":
                value = unbiased_kl(lt[a], log_old[a], log_ref[a])
            else:
                value = k3_kl(lt[a], log_ref[a])
            rows.append(torch.autograd.grad(value, theta)[0])
        return torch.stack(rows)

    # unbiased estimator: value
    est = estimate("unbiased")
    mean = est.mean()
    se = est.detach().std() / math.sqrt(n)
    assert se < 0.01
    assert abs(mean.item() - exact_kl.item()) < 5 * se
    # unbiased estimator: gradient of the sample mean (autograd through the non-detached ratio)
    (grad,) = torch.autograd.grad(mean, theta)
    grad_se = per_action_grads("unbiased")[samples].std(dim=0) / math.sqrt(n)
    assert (grad - exact_grad).abs().le(5 * grad_se + 1e-12).all(), (grad, exact_grad, grad_se)

    # plain K3 sampled from pi_old: biased by many standard errors, in value and gradient
    est = estimate("k3")
    mean = est.mean()
    se = est.detach().std() / math.sqrt(n)
    assert abs(mean.item() - exact_kl.item()) > 20 * se
    (grad,) = torch.autograd.grad(mean, theta)
    grad_se = per_action_grads("k3")[samples].std(dim=0) / math.sqrt(n)
    assert ((grad - exact_grad).abs() > 20 * grad_se).any()


# ----------------------------------------------------------------------------- off-policy mask


def test_offpolicy_sequence_mask_cases() -> None:
    # per-token divergence old_logp - logp; delta = 0.5
    old = t(-1.0, -1.0).expand(5, 2).clone()
    logp = torch.stack(
        [
            t(-2.0, -2.0),  # A<0, divergence 1.0 > 0.5            -> masked
            t(-2.0, -2.0),  # A>0, divergence 1.0                  -> kept (positive never masked)
            t(-1.1, -1.1),  # A<0, divergence 0.1 <= 0.5           -> kept
            t(-2.0, -2.0),  # A=0, divergence 1.0                  -> kept
            t(-1.5, -1.5),  # A<0, divergence exactly 0.5 (strict) -> kept
        ]
    ).requires_grad_()
    adv = t(-1.0, 1.0, -1.0, 0.0, -1.0)
    m = offpolicy_sequence_mask(old, logp, adv, torch.ones(5, 2), delta=0.5)
    assert m.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert m.dtype == F64 and not m.requires_grad


def test_offpolicy_sequence_mask_ignores_padding() -> None:
    # one counted token with divergence 0.1; padded tokens hold a huge divergence and nan
    old = t(-1.0, 0.0, float("nan"))[None]
    logp = t(-1.1, -50.0, -50.0)[None]
    mask = torch.tensor([[1, 0, 0]])
    assert offpolicy_sequence_mask(old, logp, t(-1.0), mask, delta=0.5).tolist() == [1.0]
    # the sequence mean is over |o_i| = 2, not T = 3: divergences (0.1, 1.3) -> 0.7 > 0.5
    logp = t(-1.1, -1.3, -50.0)[None]
    mask = torch.tensor([[1, 1, 0]])
    assert offpolicy_sequence_mask(old, logp, t(-1.0), mask, delta=0.5).tolist() == [0.0]


# ----------------------------------------------------------------------------- grpo_loss


def test_grpo_loss_single_token_hand_values() -> None:
    # pi_theta = 0.5, pi_old = pi_ref = 0.25, A = 1: r = 2 -> surrogate clip(2) * 1 = 1.2
    #   unbiased KL = 2 ln2 - 1, K3 = ln2 - 0.5, beta = 0.1
    logp = torch.log(t(0.5))[None, :]
    old = torch.log(t(0.25))[None, :]
    ref = torch.log(t(0.25))[None, :]
    args = (logp, old, ref, t(1.0), torch.ones(1, 1))
    loss_none, m = grpo_loss(*args, kl_coef=0.1, kl_estimator="none")
    loss_unb, m_unb = grpo_loss(*args, kl_coef=0.1, kl_estimator="unbiased")
    loss_k3, m_k3 = grpo_loss(*args, kl_coef=0.1, kl_estimator="k3")
    assert loss_none.item() == pytest.approx(-1.2)
    assert loss_unb.item() == pytest.approx(-1.2 + 0.1 * (2 * LN2 - 1))
    assert loss_k3.item() == pytest.approx(-1.2 + 0.1 * (LN2 - 0.5))
    assert m_unb["pg_loss"] == pytest.approx(-1.2) and m_unb["loss"] == pytest.approx(loss_unb.item())
    assert m_unb["kl"] == pytest.approx(2 * LN2 - 1) and m_k3["kl"] == pytest.approx(LN2 - 0.5)
    assert m["clip_frac"] == 1.0 and m["ratio_mean"] == pytest.approx(2.0)
    assert m["logp_mismatch"] == pytest.approx(LN2)
    # "none" needs no reference model
    loss, _ = grpo_loss(logp, old, None, t(1.0), torch.ones(1, 1), kl_estimator="none")
    assert loss.item() == pytest.approx(-1.2)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, t(1.0), torch.ones(1, 1), kl_estimator="unbiased")


def test_grpo_loss_offpolicy_mask_switch() -> None:
    # two sequences of 2 tokens, old_logp - logp = 0.5 on every token -> r = e^-0.5 = 0.60653
    #   seq 0, A = -1: min(-0.60653, 0.8 * -1) = -0.8 (clipped branch); divergence 0.5 > 0.1 -> masked
    #   seq 1, A = +1: min(0.60653, 0.8) = 0.60653
    r = math.exp(-0.5)
    logp = torch.full((2, 2), -1.5, dtype=F64)
    old = torch.full((2, 2), -1.0, dtype=F64)
    adv = t(-1.0, 1.0)
    mask = torch.ones(2, 2)
    loss_off, m_off = grpo_loss(logp, old, None, adv, mask, kl_estimator="none", offpolicy_delta=None)
    loss_on, m_on = grpo_loss(logp, old, None, adv, mask, kl_estimator="none", offpolicy_delta=0.1)
    assert loss_off.item() == pytest.approx(-(-0.8 + r) / 2)
    # the masked sequence still counts in 1/N: -(0 + r) / 2, not -r
    assert loss_on.item() == pytest.approx(-r / 2)
    assert m_off["masked_seq_frac"] == 0.0 and m_on["masked_seq_frac"] == 0.5
    assert m_on["clip_frac"] == 0.5  # the two A<0 tokens have r < 0.8
    # a delta above the divergence masks nothing
    loss_big, _ = grpo_loss(logp, old, None, adv, mask, kl_estimator="none", offpolicy_delta=0.6)
    assert loss_big.item() == pytest.approx(loss_off.item())


def test_grpo_loss_clip_frac_direction() -> None:
    # tokens: (r=1.5, A>0) clipped; (r=0.5, A>0) not; (r=0.5, A<0) clipped; (r=1.5, A<0) not
    logp = torch.log(t(1.5, 0.5, 0.5, 1.5)).reshape(4, 1)
    old = torch.zeros(4, 1, dtype=F64)
    _, m = grpo_loss(logp, old, None, t(1, 1, -1, -1), torch.ones(4, 1), kl_estimator="none")
    assert m["clip_frac"] == 0.5
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_mean"] == pytest.approx(1.0)


def _loop_grpo_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, delta, mask_kl=False, samp=None,
                    estimator="unbiased"):
    """DeepSeek-V3.2's equation (section 3.1) written out with plain Python loops over sequences and tokens,
    on Python floats, with its gradient worked out by hand:

        -J = -(1/N) sum_i (1/|o_i|) sum_t [ min(r A, clip(r, 1-eps_low, 1+eps_high) A) M_i - beta KL (M_i) ]

    M_i multiplies the KL term only when mask_kl. The mask compares `samp` (the sampling policy's log-probs;
    default `old`) with logp; r = pi_theta / pi_old. Returns (loss, d loss / d logp as nested lists).
        d(r A)/dlogp = r A (0 where the clipped branch is the min);
        unbiased KL = r (x - log x - 1), x = pi_ref/pi_theta: dKL/dlogp = r (logp - ref);
        K3 = x - log x - 1: dK3/dlogp = 1 - x.
    """
    samp = old if samp is None else samp
    n, seq_len = len(logp), len(logp[0])
    total = 0.0
    grad = [[0.0] * seq_len for _ in range(n)]
    for i in range(n):
        tokens = [j for j in range(seq_len) if mask[i][j] > 0]
        if not tokens:
            continue  # an empty response adds nothing, but still counts in 1/N
        length = len(tokens)
        a = adv[i]
        divergence = sum(samp[i][j] - logp[i][j] for j in tokens) / length
        m_i = 0.0 if (delta is not None and a < 0 and divergence > delta) else 1.0
        kl_weight = m_i if mask_kl else 1.0
        for j in tokens:
            r = math.exp(logp[i][j] - old[i][j])
            clipped_r = min(max(r, 1 - eps_low), 1 + eps_high)
            if r * a <= clipped_r * a:
                surrogate, d_surrogate = r * a, r * a
            else:
                surrogate, d_surrogate = clipped_r * a, 0.0
            d = ref[i][j] - logp[i][j]
            if estimator == "unbiased":
                kl, d_kl = r * (math.expm1(d) - d), r * (logp[i][j] - ref[i][j])
            else:
                kl, d_kl = math.expm1(d) - d, -math.expm1(d)
            total += (m_i * surrogate - beta * kl_weight * kl) / length
            grad[i][j] = -(m_i * d_surrogate - beta * kl_weight * d_kl) / length / n
    return -total / n, grad


def test_grpo_loss_matches_loop_on_random_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    n, seq_len = 6, 7
    logp = -torch.rand(n, seq_len, dtype=F64, generator=gen) * 3
    old = logp + torch.randn(n, seq_len, dtype=F64, generator=gen) * 0.4
    ref = logp + torch.randn(n, seq_len, dtype=F64, generator=gen) * 0.3
    adv = t(1.0, -0.5, -1.5, 0.7, -0.2, 0.0)
    lengths = [7, 3, 5, 1, 6, 4]
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, kl_estimator="unbiased")
    delta = 0.05

    leaf = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(leaf, old, ref, adv, mask, offpolicy_delta=delta, **kwargs)
    loss.backward()
    expected, expected_grad = _loop_grpo_loss(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 0.05, delta
    )

    assert loss.item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(leaf.grad, torch.tensor(expected_grad, dtype=F64))
    assert leaf.grad[mask == 0].abs().max() == 0
    # the batch exercises the mask and the clip (not vacuous)
    assert 0 < metrics["masked_seq_frac"] < 1
    assert 0 < metrics["clip_frac"] < 1

    counted = mask.bool()
    ratio = torch.exp(logp - old)[counted]
    kl = unbiased_kl(logp, old, ref)[counted]
    assert metrics["loss"] == pytest.approx(expected)
    assert metrics["kl"] == pytest.approx(kl.mean().item())
    assert metrics["ratio_mean"] == pytest.approx(ratio.mean().item())
    assert metrics["ratio_max"] == pytest.approx(ratio.max().item())
    assert metrics["logp_mismatch"] == pytest.approx((old - logp)[counted].abs().mean().item())
    assert all(isinstance(v, float) for v in metrics.values())
    # switching the mask off or the KL off changes the loss
    loss_no_mask, _ = grpo_loss(logp, old, ref, adv, mask, offpolicy_delta=None, **kwargs)
    no_kl = {**kwargs, "kl_estimator": "none"}
    loss_no_kl, _ = grpo_loss(logp, old, ref, adv, mask, offpolicy_delta=delta, **no_kl)
    assert abs(loss_no_mask.item() - loss.item()) > 1e-3
    assert abs(loss_no_kl.item() - loss.item()) > 1e-4


def test_grpo_loss_ignores_garbage_in_padding() -> None:
    logp = t(-0.7, -1.2, 0.0, 0.0).reshape(2, 2)
    old = t(-0.9, -1.0, 0.0, 0.0).reshape(2, 2)
    ref = t(-0.8, -1.1, 0.0, 0.0).reshape(2, 2)
    mask = torch.tensor([[1, 0], [1, 0]])
    adv = t(1.0, -1.0)
    clean, _ = grpo_loss(logp, old, ref, adv, mask)
    bad = {"logp": logp.clone(), "old": old.clone(), "ref": ref.clone()}
    bad["logp"][:, 1] = float("-inf")
    bad["old"][:, 1] = float("nan")
    bad["ref"][:, 1] = float("inf")
    leaf = bad["logp"].requires_grad_()
    loss, metrics = grpo_loss(leaf, bad["old"], bad["ref"], adv, mask)
    loss.backward()
    torch.testing.assert_close(loss, clean)
    assert torch.isfinite(leaf.grad).all() and leaf.grad[:, 1].abs().max() == 0
    assert all(math.isfinite(v) for v in metrics.values())


def test_grpo_loss_upcasts_low_precision_and_keeps_gradient_to_logp_only() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.4]])).to(torch.bfloat16).requires_grad_()
    old = torch.log(torch.tensor([[0.45, 0.4]])).to(torch.bfloat16).requires_grad_()
    ref = torch.log(torch.tensor([[0.5, 0.3]])).to(torch.bfloat16)
    loss, _ = grpo_loss(logp, old, ref, torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad is not None and old.grad is None


def _random_case(seed: int, dtype: torch.dtype):
    """A batch with every case the equation distinguishes: padded and empty responses, loss-mask holes
    (tool results inside an agent episode), clipped tokens on both sides, sequences dropped by M_i and
    negative-advantage ones kept, zero advantages; pi_samp differs from pi_old in half the cases."""
    gen = torch.Generator().manual_seed(seed)
    n, seq_len = 8, 9
    logp = -torch.rand(n, seq_len, dtype=F64, generator=gen) * 3 - 0.05
    old = logp + torch.randn(n, seq_len, dtype=F64, generator=gen) * 0.5
    ref = logp + torch.randn(n, seq_len, dtype=F64, generator=gen) * 0.4
    samp = old if seed % 2 == 0 else old + torch.randn(n, seq_len, dtype=F64, generator=gen) * 0.3
    adv = torch.randn(n, dtype=F64, generator=gen)
    adv[0] = 0.0
    lengths = torch.randint(1, seq_len + 1, (n,), generator=gen)
    lengths[1] = 0  # an empty response
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).to(F64)
    mask[2, 1:3] = 0.0  # a hole inside a response
    delta = [0.05, 0.2, None][seed % 3]
    return [x.to(dtype) for x in (logp, old, ref, samp, adv, mask)] + [delta]


@pytest.mark.parametrize("mask_kl", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_grpo_loss_equals_loop_form_of_the_paper_on_random_cases(mask_kl: bool, dtype: torch.dtype) -> None:
    seen = {"dropped": 0, "clipped": 0, "dropped_with_kl": 0}
    for seed in range(24):
        logp, old, ref, samp, adv, mask, delta = _random_case(seed, dtype)
        beta = [0.3, 0.0, 0.05, 0.5][seed % 4]
        estimator = "k3" if seed % 5 == 4 else "unbiased"
        eps_low, eps_high = 0.2, [0.2, 0.28][seed % 2]
        leaf = logp.clone().requires_grad_()
        loss, metrics = grpo_loss(
            leaf, old, ref, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high, kl_coef=beta,
            kl_estimator=estimator, offpolicy_delta=delta, mask_kl=mask_kl, sampling_logp=samp,
        )
        loss.backward()
        f = lambda x: x.to(F64).tolist()  # noqa: E731
        expected, expected_grad = _loop_grpo_loss(
            f(logp), f(old), f(ref), f(adv), f(mask), eps_low, eps_high, beta, delta, mask_kl, f(samp), estimator
        )
        assert loss.item() == pytest.approx(expected, abs=1e-6), seed
        torch.testing.assert_close(leaf.grad.to(F64), torch.tensor(expected_grad, dtype=F64), atol=1e-6, rtol=0)
        seen["dropped"] += metrics["masked_seq_frac"] > 0
        seen["clipped"] += metrics["clip_frac"] > 0
        seen["dropped_with_kl"] += metrics["masked_seq_frac"] > 0 and beta > 0
    # the cases are not vacuous: the mask drops sequences, the clip is active, and some drops carry a KL term
    assert seen["dropped"] >= 6 and seen["clipped"] >= 20 and seen["dropped_with_kl"] >= 4, seen


def test_mask_kl_keeps_the_kl_pull_on_dropped_sequences_only_when_false() -> None:
    # one sequence, A < 0, divergence 1 > delta: dropped. Without mask_kl its KL term stays in the loss.
    logp, old, ref = t(-2.0, -2.0)[None], t(-1.0, -1.0)[None], t(-1.5, -1.5)[None]
    r, d = math.exp(-1.0), 0.5
    kl = r * (math.expm1(d) - d)
    paper, m = grpo_loss(logp, old, ref, t(-1.0), torch.ones(1, 2), kl_coef=0.1, offpolicy_delta=0.5)
    keel_old, _ = grpo_loss(logp, old, ref, t(-1.0), torch.ones(1, 2), kl_coef=0.1, offpolicy_delta=0.5, mask_kl=True)
    assert m["masked_seq_frac"] == 1.0
    assert paper.item() == pytest.approx(0.1 * kl) and keel_old.item() == 0.0


def test_sampling_logp_drives_the_mask_and_old_logp_the_ratio() -> None:
    # pi_old = pi_theta (the trainer's own log-probs): r = 1 exactly; pi_samp is 1 nat above: divergence 1
    logp = t(-1.0, -2.0)[None]
    samp = logp + 1.0
    loss, m = grpo_loss(logp, logp.clone(), None, t(-1.0), torch.ones(1, 2), kl_estimator="none",
                        offpolicy_delta=0.5, sampling_logp=samp)
    assert m["ratio_max"] == 1.0 and m["ratio_mean"] == 1.0 and m["clip_frac"] == 0.0
    assert m["masked_seq_frac"] == 1.0 and loss.item() == 0.0
    assert m["logp_mismatch"] == pytest.approx(1.0)  # against pi_samp, not pi_old
    # the same batch with pi_old = pi_samp (engine mode): r = e^-1, clipped, and still masked
    _, m_engine = grpo_loss(logp, samp, None, t(-1.0), torch.ones(1, 2), kl_estimator="none", offpolicy_delta=0.5)
    assert m_engine["ratio_max"] == pytest.approx(math.exp(-1.0)) and m_engine["clip_frac"] == 1.0
    assert m_engine["masked_seq_frac"] == 1.0
