"""Each of DeepSeek-V3.2's four stabilisers is a switch, and switching it off changes the GRPO loss.

The batch is built the way a rollout worker builds it, from a model whose weights differ a little from
the trainer's (as after an off-policy step): recorded routing, kept sets and engine log-probs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import DeepseekV32Config

from rl.algo.batch import make_rollout_batch, rollout_schema, with_columns
from rl.algo.config import GRPOConfig
from rl.model.checkpoint import build_model
from rl.model.presets import preset
from trainer.batching import to_train_tensors
from trainer.objective import grpo_objective, policy_logprobs

OPTIONS = dict(
    keep_routing=True, keep_sampling_mask=True, kl_estimator="unbiased", kl_coef=0.1, offpolicy_delta=0.05,
    clip_eps_low=0.2, clip_eps_high=0.2, logprob_chunk=1024, indexer_loss_coef=1.0,
)
TOP_K = 6


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    config = DeepseekV32Config(**preset("tiny", initializer_range=0.1))
    policy = build_model(config, seed=0).eval()
    with torch.no_grad():
        for block in policy.model.layers[1:]:
            block.mlp.gate.weight.normal_(0, 0.3)
    sampler = copy.deepcopy(policy)  # the weights that sampled: pi_old
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = []
    gen = torch.Generator().manual_seed(1)
    for i in range(8):
        prompt = [1] + torch.randint(3, 54, (4,), generator=gen).tolist()
        seq = list(prompt)
        kept_sets, logps = [], []
        with torch.no_grad():
            for _ in range(5):  # sample top-k from pi_old, as the engine does
                logits = sampler.logits(sampler(torch.tensor([seq])).hidden)[0, -1]
                top = logits.topk(TOP_K)
                probs = top.values.softmax(-1)
                j = torch.multinomial(probs, 1, generator=gen).item()
                seq.append(top.indices[j].item())
                kept_sets.append(sorted(top.indices.tolist()))
                logps.append(probs[j].log().item())
            routing = sampler(torch.tensor([seq[:-1]]), return_routing=True).routing[0]
        rows.append(dict(
            prompt_index=i // 4, sample_index=i % 4, prompt_ids=prompt, response_ids=seq[len(prompt):],
            rollout_logprobs=logps, sampling_mask=kept_sets, routed_experts=routing.sort(-1).values.numpy(),
            loss_mask=None, finish_reason="length", policy_version=0,
        ))
    schema = rollout_schema(policy.moe_layers, config.num_experts_per_tok, config.n_routed_experts)
    batch = make_rollout_batch(rows, schema)
    batch = with_columns(batch, advantage=[1.0, -1.0, -0.5, 0.5, -1.0, 1.0, 0.5, -0.5])
    return policy, reference, batch


def loss_with(setting, **changes) -> float:
    policy, reference, batch = setting
    options = {**OPTIONS, **changes}
    experts = policy.config.num_experts_per_tok
    data = to_train_tensors(batch, experts, with_routing=True, with_mask=options["keep_sampling_mask"])
    routing = data.routing if options["keep_routing"] else None
    with torch.no_grad():
        ref_logp, _, _ = policy_logprobs(reference, reference.lm_head.weight, data, routing, 1.0)
        loss, metrics = grpo_objective(policy, policy.lm_head.weight, data, ref_logp, GRPOConfig(**options), 1.0,
                                       train_indexer=False)
    return loss.item(), metrics


def test_recorded_routing_differs_from_the_policys_own(setting):
    policy, _, batch = setting
    data = to_train_tensors(batch, policy.config.num_experts_per_tok, with_routing=True, with_mask=True)
    with torch.no_grad():
        own = policy(data.input_ids, return_routing=True).routing.sort(-1).values
    assert not torch.equal(own, data.routing.sort(-1).values)  # else Keep Routing could not matter


@pytest.mark.parametrize(
    "switch",
    [
        {"keep_routing": False},
        {"keep_sampling_mask": False},
        {"kl_estimator": "none"},
        {"kl_estimator": "k3"},
        {"offpolicy_delta": None},
    ],
)
def test_switching_a_stabiliser_off_changes_the_loss(setting, switch):
    base, base_metrics = loss_with(setting)
    changed, _ = loss_with(setting, **switch)
    assert np.isfinite(base) and np.isfinite(changed)
    assert abs(changed - base) > 1e-6, (switch, base, changed)
    if "offpolicy_delta" in switch:
        assert base_metrics["masked_seq_frac"] > 0  # the mask was doing something
