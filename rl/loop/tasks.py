"""What a run trains on, behind one interface the loop calls: prompts scored by reward functions
(`PromptTask`), or tool-use episodes scored by their environments' verifiers (`AgentTask`).

A task owns its dataset and answers four questions for the loop: how many training items there are,
the supervised tensors of some of them (the warm start), a rollout of some of them with rewards filled
in, and a held-out evaluation.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf

from rl.algo.batch import with_columns
from rl.loop.data import encode_prompts, load_dataset, sft_tensors


class Task(Protocol):
    num_train: int  # items a step's indices are drawn from
    full_reward: float  # the reward of a fully correct response

    def sft_tensors(self, indices: list[int]) -> tuple[torch.Tensor, ...]: ...

    def rollout(self, client: Any, indices: list[int], sampling: dict,
                step: int) -> tuple[pa.RecordBatch, dict[str, float], list[str]]: ...

    def evaluate(self, client: Any, sampling: dict) -> dict[str, float]: ...

    def report(self, before: dict[str, float], after: dict[str, float]) -> str | None: ...


def make_task(cfg: DictConfig, tokenizer: Any) -> Task:
    if cfg.get("agent", {}).get("enabled"):  # runs written before the agent section have none
        from rl.loop.agent_task import AgentTask

        return AgentTask(cfg, tokenizer)
    return PromptTask(cfg, tokenizer)


class PromptTask:
    """`data` prompts (a generated task or a file), sampled G times each and scored by `rewards`."""

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        self.cfg, self.tokenizer = cfg, tokenizer
        d = cfg.data
        self.train_set = load_dataset(d.task, d.train_size, d.seed, d.max_operand)
        self.eval_set = load_dataset(d.eval_task or d.task, d.eval_size, d.eval_seed, d.max_operand)
        self.train_prompts = encode_prompts(self.train_set, tokenizer)
        self.eval_prompts = encode_prompts(self.eval_set, tokenizer)
        self.num_train = len(self.train_prompts)
        self.full_reward = sum(r.weight for r in cfg.rewards)
        self._check_lengths()

    def _check_lengths(self) -> None:
        longest = max(len(p) for p in self.train_prompts + self.eval_prompts) + self.cfg.rollout.max_tokens
        if longest > self.cfg.rollout.engine.max_model_len:
            raise ValueError(
                f"the longest prompt plus rollout.max_tokens is {longest} tokens > rollout.engine.max_model_len="
                f"{self.cfg.rollout.engine.max_model_len}; raise max_model_len or shorten the task"
            )

    def sft_tensors(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Reference answers to the given training prompts (only those rows are read)."""
        rows = self.train_set.take(indices)
        answers = [str(a) for a in rows.column("answer").to_pylist()]
        return sft_tensors(rows.column("prompt").to_pylist(), answers, self.tokenizer)

    def score(self, batch: pa.RecordBatch, rows: list[dict]) -> tuple[list[float], list[str], list[str]]:
        """(scores, failure reasons, response texts) of a batch's responses to the given dataset rows."""
        from rewards.scoring import RewardSpec, score_responses

        responses = [self.tokenizer.decode(ids) for ids in batch.column("response_ids").to_pylist()]
        specs = [RewardSpec(r.name, r.weight, OmegaConf.to_container(r.kwargs)) for r in self.cfg.rewards]
        results = score_responses(responses, rows, specs, use_ray=True)
        return [r.score for r in results], [r.reason for r in results], responses

    def rollout(self, client: Any, indices: list[int], sampling: dict,
                step: int) -> tuple[pa.RecordBatch, dict[str, float], list[str]]:
        batch = client.generate([self.train_prompts[i] for i in indices], sampling, policy_version=step)
        t = time.perf_counter()
        sample_rows = self.train_set.take(indices).to_pylist()
        rows = [sample_rows[i] for i in batch.column("prompt_index").to_pylist()]
        rewards, reasons, texts = self.score(batch, rows)
        metrics = {"time/reward": time.perf_counter() - t}
        return with_columns(batch, reward=rewards, reward_reason=reasons), metrics, texts

    def evaluate(self, client: Any, sampling: dict) -> dict[str, float]:
        """Held-out accuracy (the fraction of responses that earn every reward in full) and mean reward."""
        batch = client.generate(self.eval_prompts, sampling, policy_version=-1)
        scores, _, _ = self.score(batch, self.eval_set.to_pylist())
        return {"eval/accuracy": sum(s >= self.full_reward - 1e-6 for s in scores) / len(scores),
                "eval/reward": sum(scores) / len(scores)}

    def report(self, before: dict[str, float], after: dict[str, float]) -> str | None:
        return None
