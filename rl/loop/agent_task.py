"""The agent domain of `keel train` (`agent.enabled: true`): environments instead of prompts.

- Dataset: `agent.train_size` environments, each a (kind, seed) pair rebuilt on demand at
  `agent.difficulty`; a held-out set of `agent.eval_size` from another seed.
- Warm start (`sft.steps > 0`): supervised steps on the scripted oracle's episodes
  (`rollout.agent.environments.oracles.solve`), loss on the assistant turns only, so the model
  learns the layout, the tools and thinking between calls before RL.
- Rollouts: each of the step's environments is played G times from fresh copies
  (`rollout.agent.loop.run_episodes`); the G episodes are one GRPO group, and the environment's
  verifier is the reward.
- Evaluation: one greedy episode per held-out environment, with `agent.eval_context_strategy`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch
from omegaconf import DictConfig

from rl.loop.data import pad_sft_sequences
from rollout.agent.context import make_room
from rollout.agent.environments import Environment, environment_specs, make_environment
from rollout.agent.environments.oracles import solve
from rollout.agent.loop import run_episodes
from rollout.agent.messages import Message
from rollout.agent.template import get_template
from rollout.agent.tokens import encode_text


def demonstration(messages: list[Message], template: Any, tokenizer: Any,
                  tools: list[dict], train_from: int = 0) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation: mask 1 on the assistant turns' own tokens.

    Tokenised the way the rollout loop sees an episode: the first generation prompt with BOS, then
    each assistant turn and each stretch of text between turns on its own, so the supervised
    tokens are exactly those the model would generate. Assistant turns before message `train_from`
    are context (mask 0), as a kept turn is after a context cut.
    """
    ids: list[int] = []
    mask: list[int] = []
    text = ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, tools=tools)
        turn = template.render(messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not prompt.startswith(text) or not turn.startswith(prompt):
            raise ValueError(f"template {template.name} does not render this conversation append-only")
        context = (template.encode(messages[:i], tokenizer, add_generation_prompt=True, tools=tools) if not ids
                   else encode_text(tokenizer, prompt[len(text):]))
        generated = encode_text(tokenizer, turn[len(prompt):])
        ids += context + generated
        mask += [0] * len(context) + [int(i >= train_from)] * len(generated)
        text = turn
    return ids, mask


def cut_demonstration(messages: list[Message], strategy: str) -> list[Message] | None:
    """The conversation with its tool history cut by a discard `strategy` right before the final assistant
    turn (what the loop's `make_room` leaves when the answer turn does not fit), or None when nothing is cut."""
    if strategy not in ("discard_75", "discard_all"):
        raise ValueError(f"agent.sft_cut_demos needs agent.eval_context_strategy discard_75 or discard_all, "
                         f"got {strategy!r}")
    context, record = make_room(messages[:-1], strategy)
    return [*context, messages[-1]] if record["applied"] else None


class AgentTask:
    """The environments of a run and the three things the driver does with them."""

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        self.cfg, self.agent, self.tokenizer = cfg, cfg.agent, tokenizer
        self.template = get_template(self.agent.template)
        self.train_specs = environment_specs(self.agent.environment, self.agent.train_size, self.agent.seed)
        self.eval_specs = environment_specs(self.agent.environment, self.agent.eval_size, self.agent.eval_seed)
        self.num_train = len(self.train_specs)
        self.full_reward = 1.0  # an environment's verifier scores an episode 0 or 1

    def environment(self, spec: tuple[str, int]) -> Environment:
        return make_environment(*spec, difficulty=self.agent.difficulty)

    def _messages(self, env: Environment) -> list[Message]:
        system = [Message("system", self.agent.system_prompt)] if self.agent.system_prompt else []
        return [*system, Message("user", env.task)]

    def sft_tensors(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, targets, loss_mask) of the oracle's episodes on the given training environments
        (and, with agent.sft_cut_demos, of their final turns after a context cut)."""
        seqs, masks = [], []
        for i in indices:
            env = self.environment(self.train_specs[i])
            messages = [*self._messages(env), *solve(env)]
            ids, mask = demonstration(messages, self.template, self.tokenizer, env.tools)
            if len(ids) > self.agent.max_total_tokens:
                raise ValueError(f"an oracle episode of {len(ids)} tokens exceeds agent.max_total_tokens="
                                 f"{self.agent.max_total_tokens}; raise it or lower agent.difficulty")
            seqs.append(ids)
            masks.append(mask)
            if self.agent.sft_cut_demos:
                cut = cut_demonstration(messages, self.agent.eval_context_strategy)
                if cut is not None:
                    ids, mask = demonstration(cut, self.template, self.tokenizer, env.tools, train_from=len(cut) - 1)
                    seqs.append(ids)
                    masks.append(mask)
        return pad_sft_sequences(seqs, masks)

    def play(self, client: Any, specs: list[tuple[str, int]], copies: int, sampling: dict, strategy: str,
              version: int) -> tuple[pa.RecordBatch, dict[str, float]]:
        envs = [self.environment(spec) for spec in specs for _ in range(copies)]
        return run_episodes(client, envs, self.template, self.tokenizer, sampling, self.agent.max_turns,
                            self.agent.max_total_tokens, strategy, policy_version=version,
                            prompt_indices=[k // copies for k in range(len(envs))],
                            system_prompt=self.agent.system_prompt or None, schedule=self.agent.schedule)

    def rollout(self, client: Any, indices: list[int], sampling: dict,
                step: int) -> tuple[pa.RecordBatch, dict[str, float], list[str]]:
        """G episodes per chosen training environment (G = sampling["n"]), rewarded by its verifier; the
        verifiers run inside the episodes, so no separate reward time is reported."""
        specs = [self.train_specs[i] for i in indices]
        batch, metrics = self.play(client, specs, sampling["n"], sampling, self.agent.context_strategy, client.version)
        texts = [self.tokenizer.decode(ids) for ids in batch.column("response_ids").to_pylist()]
        return batch, metrics, texts

    def evaluate(self, client: Any, sampling: dict) -> dict[str, float]:
        """Held-out success rate (one greedy episode per environment), with turns and tool calls per episode."""
        batch, metrics = self.play(client, self.eval_specs, 1, sampling, self.agent.eval_context_strategy, -1)
        rewards = batch.column("reward").to_pylist()
        return {"eval/accuracy": sum(r >= 1.0 for r in rewards) / len(rewards), "eval/reward": metrics["agent/reward"],
                "eval/turns": metrics["agent/turns"], "eval/tool_calls": metrics["agent/tool_calls"],
                "eval/context_uses": metrics["context/uses"]}

    def report(self, before: dict[str, float], after: dict[str, float]) -> str | None:
        return (f"held-out episodes: turns {before.get('eval/turns', float('nan')):.2f} -> {after['eval/turns']:.2f}, "
                f"tool calls {before.get('eval/tool_calls', float('nan')):.2f} -> {after['eval/tool_calls']:.2f} "
                "per episode")
