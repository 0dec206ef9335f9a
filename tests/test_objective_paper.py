"""The trainer's GRPO objective (trainer.objective.grpo_objective, on a real model with Keep Routing and Keep
Sampling Mask) is DeepSeek-V3.2's equation: its value, and its gradient with respect to every model parameter,
equal the loop form in tests/test_grpo.py (`_loop_grpo_loss`, plain Python over sequences and tokens, with its
gradient worked out by hand) chained through the model's log-probs, for both `mask_kl` and both `old_logprobs`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_grpo import _loop_grpo_loss  # tests/ is on sys.path (pytest's rootdir-relative import)
from transformers import DeepseekV32Config

from rl.algo.batch import make_rollout_batch, rollout_schema, with_columns
from rl.algo.config import GRPOConfig
from rl.model.checkpoint import build_model
from rl.model.presets import preset
from trainer.batching import to_train_tensors
from trainer.objective import grpo_objective, policy_logprobs

ADVANTAGES = [1.0, -1.0, -0.5, 0.5, -1.0, 1.0, 0.0, -0.5]


@pytest.fixture(scope="module")
def setting():
    """A policy, a reference and a batch sampled (top-6) by a perturbed copy of the policy, as an engine one
    step behind would: the engine's log-probs differ from the policy's, so the mask drops some rows."""
    torch.manual_seed(0)
    config = DeepseekV32Config(**preset("tiny", initializer_range=0.1))
    policy = build_model(config, seed=0).eval()
    sampler, reference = copy.deepcopy(policy), copy.deepcopy(policy)
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows, gen = [], torch.Generator().manual_seed(1)
    for i in range(len(ADVANTAGES)):
        prompt = [1] + torch.randint(3, 54, (3,), generator=gen).tolist()
        seq, kept_sets, logps = list(prompt), [], []
        with torch.no_grad():
            for _ in range(3 + i % 3):  # responses of 3 to 5 tokens
                top = sampler.logits(sampler(torch.tensor([seq])).hidden)[0, -1].topk(6)
                probs = top.values.softmax(-1)
                j = torch.multinomial(probs, 1, generator=gen).item()
                seq.append(top.indices[j].item())
                kept_sets.append(sorted(top.indices.tolist()))
                logps.append(probs[j].log().item())
            routing = sampler(torch.tensor([seq[:-1]]), return_routing=True).routing[0]
        rows.append(dict(prompt_index=i // 4, sample_index=i % 4, prompt_ids=prompt, response_ids=seq[len(prompt):],
                         rollout_logprobs=logps, sampling_mask=kept_sets, loss_mask=None, finish_reason="length",
                         routed_experts=routing.sort(-1).values.numpy(), policy_version=0))
    schema = rollout_schema(policy.moe_layers, config.num_experts_per_tok, config.n_routed_experts)
    batch = with_columns(make_rollout_batch(rows, schema), advantage=ADVANTAGES)
    data = to_train_tensors(batch, config.num_experts_per_tok, with_routing=True, with_mask=True)
    return policy, reference, data


@pytest.mark.parametrize("old_logprobs", ["engine", "trainer"])
@pytest.mark.parametrize("mask_kl", [False, True])
def test_trainer_objective_and_its_gradient_are_the_papers_equation(setting, mask_kl, old_logprobs):
    policy, reference, data = setting
    options = GRPOConfig(kl_coef=0.1, offpolicy_delta=0.03, clip_eps_low=0.1, clip_eps_high=0.1, mask_kl=mask_kl,
                         old_logprobs=old_logprobs)
    head = policy.lm_head.weight
    with torch.no_grad():
        ref_logp, _, _ = policy_logprobs(reference, reference.lm_head.weight, data, data.routing, 1.0)
        own, _, _ = policy_logprobs(policy, head, data, data.routing, 1.0)
    old_logp = own if old_logprobs == "trainer" else None

    policy.zero_grad()
    loss, metrics = grpo_objective(policy, head, data, ref_logp, options, 1.0, train_indexer=False, old_logp=old_logp)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    # The loop form's d loss / d logp, chained through the same model forward.
    policy.zero_grad()
    logp, _, _ = policy_logprobs(policy, head, data, data.routing, 1.0)
    pi_old = data.old_logp if old_logp is None else old_logp
    value, d_logp = _loop_grpo_loss(
        logp.tolist(), pi_old.tolist(), ref_logp.tolist(), data.advantages.tolist(), data.response_mask.tolist(),
        options.clip_eps_low, options.clip_eps_high, options.kl_coef, options.offpolicy_delta, mask_kl,
        data.old_logp.tolist(),
    )
    (logp * torch.tensor(d_logp, dtype=logp.dtype)).sum().backward()

    assert loss.item() == pytest.approx(value, abs=1e-6)
    assert grads.keys() == {n for n, p in policy.named_parameters() if p.grad is not None}
    for n, p in policy.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the case exercises what the forms differ on: dropped rows that carry a KL term (and, with the engine's
    # pi_old, clipped tokens)
    assert 0 < metrics["masked_seq_frac"] < 1 and metrics["kl"] > 0
    if old_logprobs == "trainer":
        assert metrics["ratio_max"] == 1.0  # pi_old is the policy itself before the update
    else:
        assert metrics["clip_frac"] > 0
