"""The `agent:` section of a run config (`rl.loop.config.KeelConfig.agent`): which environments, which
template, and the episode budgets. With `enabled: true`, `keel train` plays tool-use episodes
instead of sampling answers to `data` prompts (rl/loop/agent_task.py); `data` and `rewards` are then unused.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AgentConfig:
    enabled: bool = False  # true: rollouts are tool-use episodes (`rollout.agent.loop.run_episodes`)
    environment: str = "mixed"  # search | planner | codefix | mixed (the kinds in turn)
    difficulty: int = 2  # 1-3: hops of a search question, stays of a trip, depth of the buggy code
    train_size: int = 4000  # environments drawn per run (each is a kind and a seed)
    eval_size: int = 60
    seed: int = 0
    eval_seed: int = 12345
    template: str = "compact"  # compact (the char tokenizer) | deepseek_v32 (real checkpoints)
    system_prompt: str = ""
    max_turns: int = 8  # assistant turns per episode
    max_total_tokens: int = 1024  # context budget: a turn starts only if prompt + rollout.max_tokens fits
    context_strategy: str = "none"  # in training rollouts: none | discard_all | discard_75 | summary
    eval_context_strategy: str = "discard_75"  # in evaluation
    # independent: an episode's tool calls run while the engine decodes other episodes' turns; rounds: every
    # unfinished episode's turn in one call, then all tools (last-bit reproducible log-probs whatever the tools'
    # timing). `rollout.agent.schedule`.
    schedule: str = "independent"
    # Warm start: also show each oracle demonstration's final turn after `eval_context_strategy` (discard_75 or
    # discard_all) has cut the tool history before it, so the model has seen the contexts a cut leaves.
    sft_cut_demos: bool = False
