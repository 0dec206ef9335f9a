"""The train-inference mismatch metrics (rl/algo/mismatch.py) and the ablation's run verdicts, on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from rl.algo.grpo import offpolicy_sequence_mask
from rl.algo.mismatch import (
    kept_set_disagreement,
    kept_sets,
    logp_mismatch_distribution,
    offpolicy_fraction,
    routing_agreement_per_layer,
    step_mismatch,
)
from rl.loop.metrics import collapsed, grad_norm_spikes, paired_difference


def test_routing_agreement_per_layer_compares_sets_per_layer() -> None:
    # 2 tokens, 2 MoE layers, top-2. Layer 0: same sets in another order; layer 1: token 1 differs in one expert.
    engine = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [2, 4]]])
    trainer = torch.tensor([[[1, 0], [3, 2]], [[0, 1], [3, 4]]])
    assert routing_agreement_per_layer(engine, trainer).tolist() == [1.0, 0.5]
    assert routing_agreement_per_layer(engine, engine).tolist() == [1.0, 1.0]


def test_step_mismatch_logs_each_layer_and_the_logp_distribution() -> None:
    engine = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [2, 4]]])
    trainer = torch.tensor([[[1, 0], [3, 2]], [[0, 1], [3, 4]]])
    m = step_mismatch(torch.tensor([0.0, -1.0]), torch.tensor([-0.5, -1.0]), engine, trainer)
    assert (m["mismatch/routing_layer_0"], m["mismatch/routing_layer_1"]) == (1.0, 0.5)
    assert m["routing_agreement"] == pytest.approx(0.75)  # 3 of the 4 (token, layer) expert sets agree
    assert m["mismatch/logp_max"] == pytest.approx(0.5) and "mismatch/logp_mean" not in m
    assert m["logp_mismatch_first"] == pytest.approx(0.25)
    unrouted = step_mismatch(torch.tensor([0.0]), torch.tensor([0.0]))
    assert math.isnan(unrouted["routing_agreement"]) and not any("routing_layer" in k for k in unrouted)


def test_routing_agreement_per_layer_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="tokens, layers, top_k"):
        routing_agreement_per_layer(torch.zeros(3, 2, 2), torch.zeros(3, 1, 2))


def test_kept_sets_top_k_and_vllms_top_p_rule() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert kept_sets(logits, top_k=2, top_p=1.0).tolist() == [[True, True, False, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # ascending 0.05, 0.15, 0.3, 0.5: cumulative 0.05, 0.2, 0.5, 1.0; dropped where <= 1 - 0.8 = 0.2
    assert kept_sets(probs.log(), top_k=0, top_p=0.8).tolist() == [[True, True, False, False]]
    assert kept_sets(probs.log(), top_k=0, top_p=0.01).tolist() == [[True, False, False, False]]  # top kept
    assert kept_sets(probs.log(), top_k=3, top_p=0.6).tolist() == [[True, True, False, False]]  # top-k first


def test_kept_set_disagreement_counts_positions_whose_sets_differ() -> None:
    engine = torch.tensor([[0, 1, -1], [2, 3, -1], [0, -1, -1]])
    trainer = torch.zeros(3, 5, dtype=torch.bool)
    trainer[0, [0, 1]] = True
    trainer[1, [2, 4]] = True
    trainer[2, 0] = True  # token 0 kept, and padding (-1) must not clear it
    assert kept_set_disagreement(engine, trainer) == pytest.approx(1 / 3)


def test_logp_mismatch_distribution_and_kl_estimates() -> None:
    engine, trainer = torch.tensor([0.0, -1.0]), torch.tensor([-0.5, -1.0])
    d = logp_mismatch_distribution(engine, trainer)
    assert d["mean"] == pytest.approx(0.25) and d["max"] == pytest.approx(0.5) and d["p50"] == pytest.approx(0.25)
    assert d["kl_k1"] == pytest.approx(0.25)
    assert d["kl_k3"] == pytest.approx((math.exp(-0.5) - 1 + 0.5) / 2)
    same = logp_mismatch_distribution(engine, engine)
    assert same["max"] == 0.0 and same["kl_k3"] == 0.0


def test_offpolicy_fraction_matches_the_mask_on_negative_advantages() -> None:
    engine = torch.tensor([[0.0, 0.0], [-0.1, 0.0], [-1.0, -1.0]])
    trainer = torch.tensor([[-0.6, -0.6], [-0.2, 0.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # row 3: only its first token counts (gap 1.0)
    assert offpolicy_fraction(engine, trainer, mask, delta=0.5) == pytest.approx(2 / 3)
    kept = offpolicy_sequence_mask(engine, trainer, -torch.ones(3), mask, delta=0.5)
    assert offpolicy_fraction(engine, trainer, mask, delta=0.5) == pytest.approx(1 - kept.mean().item())


def test_grad_norm_spikes_against_the_runs_median() -> None:
    assert grad_norm_spikes([1.0, 1.2, 0.9, 10.0, 1.1]) == 1
    assert grad_norm_spikes([1.0, 2.9, 1.0]) == 0
    assert grad_norm_spikes([]) == 0 and grad_norm_spikes([float("nan"), 1.0]) == 0


def test_collapsed_when_the_smoothed_reward_ends_below_half_its_best() -> None:
    rise = [0.1 * t for t in range(10)]
    assert collapsed(rise + [0.9] * 10 + [0.1] * 20, window=10)  # fell and stayed down
    assert not collapsed(rise + [0.9] * 10 + [0.1] * 3 + [0.9] * 10, window=10)  # a dip, then back
    assert not collapsed(rise + [0.9] * 10, window=10)
    assert not collapsed([0.0] * 30)  # never learned: not a collapse


def test_paired_difference_over_seeds() -> None:
    # Seeds differ by 0.2 between themselves; the switch adds 0.05, 0.03, 0.07: the pairing sees only the latter.
    control = [0.2, 0.4, 0.6]
    mean, se = paired_difference([0.25, 0.43, 0.67], control)
    assert mean == pytest.approx(0.05)
    assert se == pytest.approx(0.02 / math.sqrt(3))  # stdev(0.05, 0.03, 0.07) = 0.02
    mean, se = paired_difference([0.3], [0.2])
    assert mean == pytest.approx(0.1) and math.isnan(se)
    with pytest.raises(ValueError, match="one control per treated run"):
        paired_difference([0.1, 0.2], [0.1])


def test_engine_dtype_is_checked_by_name() -> None:
    from rollout.config import EngineConfig

    assert EngineConfig.of({"dtype": "bfloat16"}).dtype == "bfloat16"
    with pytest.raises(ValueError, match="rollout.engine.dtype='bf16'"):
        EngineConfig.of({"dtype": "bf16"})
