"""Rollout throughput: raw vLLM generate vs a keel worker capturing routing and sampling masks.

    python bench/rollout_throughput.py [--prompts 32] [--group 4] [--max-tokens 40] [--skip-small]

Prints, on the tiny preset, generated tokens/s of plain `LLM.generate` and of `RolloutWorker.generate`
(routing capture and Keep-Sampling-Mask on) over the same prompts and sampling settings, and their
ratio; then the time to publish and load a full weight update for the tiny and the ~100M "small"
preset. Engines run one at a time. Figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch

ENGINE = dict(max_model_len=64, kv_cache_space_gib=1, gpu_memory_utilization=0.05)


def write_checkpoint(preset_name: str, directory: str) -> str:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from rl.presets import preset

    torch.manual_seed(0)
    DeepseekV32ForCausalLM(DeepseekV32Config(**preset(preset_name))).save_pretrained(directory)
    return directory


def prompts_for(n: int, vocab: int) -> list[list[int]]:
    return [[1] + [(7 * i + j) % (vocab - 3) + 3 for j in range(4 + i % 8)] for i in range(n)]


def raw_vllm_tokens_per_s(checkpoint: str, prompts: list[list[int]], sampling: dict, repeats: int) -> float:
    from vllm import LLM, SamplingParams

    from rollout import serving

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(ENGINE["kv_cache_space_gib"])
    llm = LLM(
        serving.serving_dir(checkpoint, serving.on_cuda()), skip_tokenizer_init=True, dtype="float32",
        max_model_len=ENGINE["max_model_len"], gpu_memory_utilization=ENGINE["gpu_memory_utilization"],
        enforce_eager=True, seed=0,
    )
    params = SamplingParams(
        n=sampling["n"], temperature=sampling["temperature"], top_k=sampling["top_k"],
        top_p=sampling["top_p"], max_tokens=sampling["max_tokens"],
    )
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params, use_tqdm=False)  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        seconds += time.perf_counter() - t0
        tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return tokens / seconds


def keel_worker_tokens_per_s(worker, prompts: list[list[int]], sampling: dict, repeats: int) -> float:
    indices = list(range(len(prompts)))
    worker.generate(prompts, indices, sampling, 0)  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = worker.generate(prompts, indices, sampling, 0)
        seconds += time.perf_counter() - t0
        tokens += sum(len(r) for r in batch.column("response_ids").to_pylist())
    assert batch.column("routed_experts").null_count == 0 and batch.column("sampling_mask").null_count == 0
    return tokens / seconds


def weight_update_seconds(worker, checkpoint: str) -> tuple[float, float, int]:
    """(publish s, load s, parameters) for a full update with the checkpoint's own tensors, perturbed."""
    from safetensors.torch import load_file

    from rollout.weight_sync import publish_weights, release_weights

    tensors = {n: t + 1e-3 for n, t in load_file(os.path.join(checkpoint, "model.safetensors")).items()}
    t0 = time.perf_counter()
    handle = publish_weights(tensors, version=1)
    t1 = time.perf_counter()
    worker.update_weights(handle, 1)
    t2 = time.perf_counter()
    release_weights(handle)
    return t1 - t0, t2 - t1, sum(t.numel() for t in tensors.values())


def shutdown(worker) -> None:
    worker.llm.llm_engine.engine_core.shutdown()
    del worker
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-small", action="store_true", help="skip the ~100M-parameter weight update")
    args = parser.parse_args()

    from rollout.worker import RolloutWorker

    root = tempfile.mkdtemp(prefix="keel-bench-")
    tiny = write_checkpoint("tiny", os.path.join(root, "tiny"))
    prompts = prompts_for(args.prompts, vocab=64)
    sampling = dict(n=args.group, temperature=1.0, top_k=16, top_p=0.95, max_tokens=args.max_tokens)

    raw = raw_vllm_tokens_per_s(tiny, prompts, sampling, args.repeats)
    worker = RolloutWorker(tiny, ENGINE)
    keel = keel_worker_tokens_per_s(worker, prompts, sampling, args.repeats)
    publish_s, load_s, n_params = weight_update_seconds(worker, tiny)
    shutdown(worker)

    print(f"\ntiny: {args.prompts} prompts x G={args.group}, max_tokens={args.max_tokens}, {sampling=}")
    print(f"raw vLLM generate            {raw:10.0f} tokens/s")
    print(f"keel worker (routing + mask) {keel:10.0f} tokens/s")
    print(f"keel / raw                   {keel / raw:10.3f}  (overhead {100 * (1 - keel / raw):.1f}%)")
    print(f"weight update, tiny ({n_params / 1e6:.2f}M): publish {publish_s:.3f}s, load {load_s:.3f}s")

    if not args.skip_small:
        small = write_checkpoint("small", os.path.join(root, "small"))
        worker = RolloutWorker(small, ENGINE)
        publish_s, load_s, n_params = weight_update_seconds(worker, small)
        shutdown(worker)
        print(f"weight update, small ({n_params / 1e6:.0f}M): publish {publish_s:.3f}s, load {load_s:.3f}s")


if __name__ == "__main__":
    main()
