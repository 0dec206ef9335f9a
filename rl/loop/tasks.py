"""What a run trains on, behind one interface the loop calls: prompts scored by reward functions
(`PromptTask`), or tool-use episodes scored by their environments' verifiers (`AgentTask`).

A task owns its dataset and answers four questions for the loop: how many training items there are,
the supervised tensors of some of them (the warm start), a rollout of some of them with rewards filled
in, and a held-out evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol

import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf

from rl.algo.batch import with_columns
from rl.loop.config import DataConfig, as_dataclass
from rl.loop.data import (
    DataError,
    DataKeys,
    is_dataset_file,
    load_dataset,
    off_by_one_responses,
    pad_sft_sequences,
    row_field,
)
from rl.loop.formats import PromptFormat
from rl.loop.held_out import check_held_out, held_out_split


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
    """`data` prompts (a generated task or a dataset file), sampled G times each and scored by `rewards` (or by a
    row's source's rewards, `rewards_by_source`). Prompts become token ids through the data format
    (`rl/loop/formats.py`) once, here; prompts longer than the budget are dropped and counted, or stop the run."""

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        self.cfg, self.tokenizer = cfg, tokenizer
        d = self.data = as_dataclass(DataConfig, cfg.data)  # a resumed run's config.yaml may predate some keys
        self.keys = DataKeys.of(d)
        self.format = PromptFormat.of(d, tokenizer)
        self.full_reward = sum(r.weight for r in cfg.rewards)
        self.reward_specs = self._reward_specs()
        eval_task = d.eval_task or d.task
        # Generated sets are drawn disjoint; check_held_out (before training or evaluating) covers files too.
        train_set, eval_set = held_out_split(
            d.task, d.eval_task, d.train_size, d.eval_size, d.seed, d.eval_seed,
            lambda task, n, seed: load_dataset(task, n, seed, d.max_operand, self.keys, self.format.chat),
            generated=lambda task: not is_dataset_file(task))
        if d.sft_off_by_one:
            train_set = off_by_one_responses(train_set, d.sft_off_by_one, d.seed)
            self.keys = dataclasses.replace(self.keys, response="response")
        self.train_set, self.train_prompts, dropped_train = self._encode(train_set, d.task, "training")
        self.eval_set, self.eval_prompts, dropped_eval = self._encode(eval_set, eval_task, "held-out")
        self.dropped = {"data/dropped_train_prompts": float(dropped_train),
                        "data/dropped_eval_prompts": float(dropped_eval)}
        self.num_train = len(self.train_prompts)
        self.held_out_checked = False

    def check_held_out(self) -> None:
        """Raise (rl.loop.held_out.HeldOutError) when an evaluation prompt is also a training prompt. The loop calls
        it before it trains, and `evaluate` before it evaluates; a warm start alone (the specialists' base SFT, whose
        evaluation set is its training set) never evaluates and is not checked."""
        if not self.held_out_checked:
            check_held_out(self.train_set, self.eval_set, f"data.task={self.data.task!r}, "
                                                          f"data.eval_task={self.data.eval_task or self.data.task!r}")
            self.held_out_checked = True

    def _encode(self, table: pa.Table, name: str, which: str) -> tuple[pa.Table, list[list[int]], int]:
        """(the kept rows, their prompt ids, how many were dropped): a prompt must leave rollout.max_tokens of
        room in rollout.engine.max_model_len; longer ones are dropped (data.overlong=drop) or an error."""
        max_len, max_tokens = self.cfg.rollout.engine.max_model_len, self.cfg.rollout.max_tokens
        budget = max_len - max_tokens
        if budget < 1:
            raise DataError(f"rollout.max_tokens={max_tokens} leaves no room for a prompt in "
                            f"rollout.engine.max_model_len={max_len}")
        prompts, keep = [], []
        for i, row in enumerate(table.to_pylist()):
            try:
                ids = self.format.prompt_ids(row)
            except ValueError as err:  # a character the tokenizer lacks, a chat template that fails on this row
                raise DataError(f"{name}: row {i}: {err}") from None
            if len(ids) > budget:
                if self.data.overlong == "error":
                    raise DataError(
                        f"{name}: row {i}: the prompt is {len(ids)} tokens; with rollout.max_tokens={max_tokens} that "
                        f"exceeds rollout.engine.max_model_len={max_len}; raise max_model_len, shorten the prompt, or "
                        "set data.overlong=drop to skip such prompts")
                continue
            keep.append(i)
            prompts.append(ids)
        dropped = table.num_rows - len(keep)
        if dropped:
            if not keep:
                raise DataError(f"{name}: every one of its {table.num_rows} {which} prompts is longer than {budget} "
                                f"tokens (rollout.engine.max_model_len={max_len} - rollout.max_tokens={max_tokens})")
            print(f"keel: data: dropped {dropped} of {table.num_rows} {which} prompts of {name} longer than {budget} "
                  f"tokens (rollout.engine.max_model_len={max_len} - rollout.max_tokens={max_tokens}; "
                  "data.overlong=drop)")
            table = table.take(keep)
        return table, prompts, dropped

    def _reward_specs(self) -> dict[str, tuple[list, float]]:
        """source -> (its reward specs, the factor that scales its total weight to `rewards`'); "" : `rewards`."""
        from rewards.scoring import RewardSpec

        def specs(rewards) -> list:
            return [RewardSpec(r.name, r.weight, OmegaConf.to_container(r.kwargs)) for r in rewards]

        out = {"": (specs(self.cfg.rewards), 1.0)}
        for source, rewards in (self.cfg.get("rewards_by_source") or {}).items():
            out[source] = (specs(rewards), self.full_reward / sum(r.weight for r in rewards))
        return out

    def sft_tensors(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Reference responses to the given training prompts (only those rows are read): each prompt's own ids,
        then the response (data.response_key, else the answer) as the format renders the assistant's turn."""
        seqs, masks = [], []
        for i, row in zip(indices, self.train_set.take(indices).to_pylist(), strict=True):
            prompt = self.train_prompts[i]
            response = self.format.response_ids(row, str(row_field(row, self.keys.response or "answer")))
            seqs.append(prompt + response)
            masks.append([0] * len(prompt) + [1] * len(response))
        return pad_sft_sequences(seqs, masks)

    def score(self, batch: pa.RecordBatch, rows: list[dict]) -> tuple[list[float], list[str], list[str]]:
        """(scores, failure reasons, response texts) of a batch's responses to the given dataset rows."""
        from rewards.scoring import score_responses

        responses = [self.tokenizer.decode(ids) for ids in batch.column("response_ids").to_pylist()]
        groups: dict[str, list[int]] = {}  # rows by the rewards that score them
        for i, row in enumerate(rows):
            source = row.get("data_source") or ""
            groups.setdefault(source if source in self.reward_specs else "", []).append(i)
        scores, reasons = [0.0] * len(rows), [""] * len(rows)
        for source, members in groups.items():
            specs, scale = self.reward_specs[source]
            results = score_responses([responses[i] for i in members], [rows[i] for i in members], specs, use_ray=True)
            for i, r in zip(members, results, strict=True):
                scores[i], reasons[i] = r.score * scale, r.reason
        return scores, reasons, responses

    def rollout(self, client: Any, indices: list[int], sampling: dict,
                step: int) -> tuple[pa.RecordBatch, dict[str, float], list[str]]:
        batch = client.generate([self.train_prompts[i] for i in indices], sampling, policy_version=client.version)
        t = time.perf_counter()
        sample_rows = self.train_set.take(indices).to_pylist()
        rows = [sample_rows[i] for i in batch.column("prompt_index").to_pylist()]
        rewards, reasons, texts = self.score(batch, rows)
        metrics = {"time/reward": time.perf_counter() - t}
        return with_columns(batch, reward=rewards, reward_reason=reasons), metrics, texts

    def evaluate(self, client: Any, sampling: dict) -> dict[str, float]:
        """Held-out accuracy (the fraction of responses that earn every reward in full) and mean reward."""
        self.check_held_out()
        batch = client.generate(self.eval_prompts, sampling, policy_version=-1)
        scores, _, _ = self.score(batch, self.eval_set.to_pylist())
        return {"eval/accuracy": sum(s >= self.full_reward - 1e-6 for s in scores) / len(scores),
                "eval/reward": sum(scores) / len(scores), **self.dropped}

    def report(self, before: dict[str, float], after: dict[str, float]) -> str | None:
        return None
