"""The sized plan for DeepSeek-V3.2 in docs/SCALING.md: every number there is printed by this script.

Parameter counts come from keel's own model built on the meta device (preset "full": DeepSeek-V3.2, 671B +
the lightning indexer, index_topk 2048); everything else is arithmetic on the stated assumptions (ASSUME).
Run: `python bench/scaling_plan.py` (a markdown report) or `--json`.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import DeepseekV32Config

from rl.model.presets import preset
from rl.model.transformer import Transformer

GB = 1e9
ASSUME = {
    # GPUs: memory (GB), dense bf16 TFLOP/s, per-GPU NVLink (GB/s, one direction) and InfiniBand NIC (GB/s).
    "gpus": {"H100": {"mem_gb": 80, "tflops": 989, "nvlink_gbs": 450, "ib_gbs": 50},
             "H200": {"mem_gb": 141, "tflops": 989, "nvlink_gbs": 450, "ib_gbs": 50}},
    "gpus_per_node": 8,
    # keel on GPU: bf16 weights and gradients, DeepSpeed's fp32 master copy and AdamW's two fp32 moments.
    "bytes_weight": 2, "bytes_grad": 2, "bytes_master": 4, "bytes_adam": 8,
    # A step at the paper's scale (DeepSeek-R1's GRPO: 32 prompts x 16 samples; responses up to the 128K
    # context, a mean far below it).
    "prompts": 32, "group": 16, "prompt_tokens": 2048, "mean_response_tokens": 16384, "max_tokens": 131072,
    "train_mfu": 0.35,  # model FLOP utilisation of the trainer's forward+backward
    # Decode: DeepSeek's published serving figure of 14.8k output tokens/s per H800 node (8 GPUs), and a
    # single sequence's decode rate (what the longest response waits on).
    "decode_tok_s_per_node": 14800, "decode_tok_s_per_seq": 30,
    # trainer FLOPs in forward units: old log-probs (1) + reference (1) + forward and backward (3)
    "forwards_per_step": 5,
    "engine_replicas": 4,  # rollout engine replicas (each on engine_nodes_per_replica nodes)
}


def parameter_counts() -> dict[str, float]:
    with torch.device("meta"):
        model = Transformer(DeepseekV32Config(**preset("full")))
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    indexer = sum(p.numel() for p in model.indexer_parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert_layer = experts / model.moe_layers
    embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    active = total - experts + experts * cfg.num_experts_per_tok / cfg.n_routed_experts
    return {"total": total, "indexer": indexer, "routed_experts": experts, "embed_and_head": embed,
            "moe_layer_experts": per_expert_layer, "active_per_token": active,
            "dense_rest": total - experts - indexer}


def zero3_per_gpu(p: dict, n_gpus: int) -> dict[str, float]:
    """Bytes per GPU under ZeRO-3 over n_gpus: every state is 1/N; the indexer's own optimiser keeps whole fp32
    masters and moments on every rank (trainer.indexer_optim)."""
    a = ASSUME
    shard = p["total"] / n_gpus
    return {"weights": shard * a["bytes_weight"], "grads": shard * a["bytes_grad"],
            "adam_and_master": shard * (a["bytes_master"] + a["bytes_adam"]),
            "indexer_own_optimiser": p["indexer"] * (a["bytes_master"] + a["bytes_adam"]),
            # Gathered during a forward: one MoE layer whole (a ZeRO-3 leaf: all its experts at once) in bf16.
            "gathered_moe_layer": p["moe_layer_experts"] * a["bytes_weight"]}


def min_gpus(p: dict, mem_gb: float, reserve_gb: float = 30) -> int:
    """Fewest GPUs whose memory, less `reserve_gb` each for activations, the gathered layer and buffers, holds the
    sharded states (16 bytes a parameter) plus the replicated indexer optimiser."""
    a = ASSUME
    per_param = a["bytes_weight"] + a["bytes_grad"] + a["bytes_master"] + a["bytes_adam"]
    fixed = p["indexer"] * (a["bytes_master"] + a["bytes_adam"]) + p["moe_layer_experts"] * a["bytes_weight"]
    room = mem_gb * GB - reserve_gb * GB - fixed
    n = 1
    while p["total"] * per_param / n > room:
        n += 1
    return -(-n // a["gpus_per_node"]) * a["gpus_per_node"]


def step_times(p: dict, gpu: dict, n_train: int, n_engine_nodes: int) -> dict[str, float]:
    a = ASSUME
    rows = a["prompts"] * a["group"]
    tokens = rows * (a["prompt_tokens"] + a["mean_response_tokens"])
    train_flops = 2 * p["active_per_token"] * tokens * a["forwards_per_step"]
    # ZeRO-3 gathers every parameter for each micro-batch's forward and again for its backward, plus the
    # no-grad forward of the old log-probs, and reduce-scatters the gradients: each GPU receives ~ the whole
    # model's bf16 bytes each time, over its own NIC. At 128K context a micro-batch is one sequence.
    micro = -(-rows // n_train)
    zero3_bytes = (3 * micro + 1) * p["total"] * a["bytes_weight"]
    return {
        "rows": rows, "tokens": tokens,
        "micro_batches_per_gpu": micro,
        "train_compute_s": train_flops / (n_train * gpu["tflops"] * 1e12 * a["train_mfu"]),
        "zero3_comm_s": zero3_bytes / (gpu["ib_gbs"] * GB),
        "rollout_throughput_s": rows * a["mean_response_tokens"] / (n_engine_nodes * a["decode_tok_s_per_node"]),
        "rollout_longest_s": a["max_tokens"] / a["decode_tok_s_per_seq"],
    }


def weight_sync(p: dict, gpu: dict) -> dict[str, float]:
    """Bytes of one weight sync (bf16 and FP8 with 128x128-block scales) and its time from one sender over
    NVLink and over one InfiniBand NIC, and from every trainer node's NICs at once (8 per node)."""
    bf16 = p["total"] * 2
    fp8 = p["total"] * (1 + 4 / (128 * 128))
    return {"bytes_bf16": bf16, "bytes_fp8": fp8,
            "nvlink_s": bf16 / (gpu["nvlink_gbs"] * GB), "ib_one_nic_s": bf16 / (gpu["ib_gbs"] * GB),
            "ib_node_s": bf16 / (8 * gpu["ib_gbs"] * GB)}


def activations(context: int) -> dict[str, float]:
    """Bytes of one sequence of `context` tokens in training: the bf16 residual stream kept at each of the 61
    layer boundaries (activation checkpointing), one layer's indexer scores [T, T] in fp32 as keel's model
    materialises them, and the same restricted to the top-k (what a chunked kernel keeps)."""
    cfg = DeepseekV32Config(**preset("full"))
    return {"residuals_all_layers": context * cfg.hidden_size * 2 * cfg.num_hidden_layers,
            "indexer_scores_one_layer": context * context * 4,
            "topk_selection_one_layer": context * cfg.index_topk * (8 + 4)}


def report() -> dict:
    p = parameter_counts()
    out = {"assumptions": ASSUME, "params": p, "activations_128k": activations(ASSUME["max_tokens"]), "gpus": {}}
    for name, gpu in ASSUME["gpus"].items():
        n = min_gpus(p, gpu["mem_gb"])
        engine_nodes = 1 if gpu["mem_gb"] * 8 * GB > 1.2 * p["total"] else 2  # FP8 weights + KV cache per engine
        out["gpus"][name] = {"min_train_gpus": n, "per_gpu": zero3_per_gpu(p, n),
                             "per_gpu_at_128": zero3_per_gpu(p, 128), "engine_nodes_per_replica": engine_nodes,
                             "reference_model_whole_gb": p["total"] * ASSUME["bytes_weight"] / GB,
                             "step": step_times(p, gpu, n, ASSUME["engine_replicas"] * engine_nodes),
                             "sync": weight_sync(p, gpu)}
    return out


def markdown(r: dict) -> str:
    p = r["params"]
    lines = ["| parameters | count |", "| --- | ---: |"]
    lines += [f"| {k} | {v / 1e9:.2f} B |" for k, v in p.items()]
    lines += ["", "| one 128K-token sequence | bytes |", "| --- | ---: |"]
    lines += [f"| {k} | {v / GB:.1f} GB |" for k, v in r["activations_128k"].items()]
    for name, g in r["gpus"].items():
        lines += ["", f"### {name}", "", f"fewest trainer GPUs for ZeRO-3 states: {g['min_train_gpus']}", "",
                  "| bytes per GPU | at the fewest | at 128 GPUs |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v / GB:.1f} GB | {g['per_gpu_at_128'][k] / GB:.1f} GB |" for k, v in g["per_gpu"].items()]
        lines += ["", f"engine: {g['engine_nodes_per_replica']} node(s) per replica; the reference model whole "
                  f"(as keel loads it on every rank today): {g['reference_model_whole_gb']:.0f} GB", "",
                  "| step | value |",
                  "| --- | ---: |"]
        lines += [f"| {k} | {v:,.1f} |" for k, v in g["step"].items()]
        lines += [f"| sync {k} | {v / GB:,.1f} GB |" if k.startswith("bytes") else f"| sync {k} | {v:,.1f} |"
                  for k, v in g["sync"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = report()
    print(json.dumps(r, indent=1) if args.json else markdown(r))


if __name__ == "__main__":
    main()
