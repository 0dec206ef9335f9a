"""`keel eval-agent`: the context-management strategies side by side on held-out environments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rl.loop.agent_task import AgentTask


def context_strategy_table(client: Any, task: AgentTask, sampling: dict, strategies: list[str],
                           samples: int) -> dict[str, dict[str, float]]:
    """Per strategy, `samples` episodes on each held-out environment: success rate, turns and tool calls per
    episode, how many episodes needed room (context uses > 0, or ended at the budget under "none")."""
    table = {}
    for strategy in strategies:
        batch, metrics = task.play(client, task.eval_specs, samples, sampling, strategy, -1)
        n = batch.num_rows
        rewards = batch.column("reward").to_pylist()
        over = [f == "context_budget" or s > 1 for f, s in zip(batch.column("finish_reason").to_pylist(),
                                                               batch.column("segments").to_pylist(), strict=True)]
        table[strategy] = {"success": sum(r >= 1.0 for r in rewards) / n, "turns": metrics["agent/turns"],
                           "tool_calls": metrics["agent/tool_calls"], "over_budget": sum(over) / n,
                           "context_uses": metrics["context/uses"] / n, "episodes": float(n)}
    return table


def evaluate_context_strategies(cfg: DictConfig, checkpoint: str, strategies: list[str], samples: int,
                                greedy: bool) -> dict[str, dict[str, float]]:
    """Serve `checkpoint` on one rollout engine and fill `context_strategy_table` for the config's held-out
    environments at `agent.max_total_tokens` (sampling as in training unless `greedy`)."""
    from rl.loop.driver import Run, ray_session
    from rollout.client import RolloutClient

    with ray_session(cfg.run.ray_address, cfg.rollout.num_workers + 2):
        run = Run(cfg, Path(checkpoint), checkpoint=checkpoint)
        client = RolloutClient(checkpoint, cfg.rollout.num_workers, run.engine_config())
        try:
            return context_strategy_table(client, run.task, run.sampling(0, greedy=greedy), strategies, samples)
        finally:
            client.shutdown()
