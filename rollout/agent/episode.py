"""One episode of the multi-turn rollout loop: its token stream (`Segment`), its conversation (`Episode`) and the
steps the schedule (`rollout.agent.schedule`) applies to it, with no engine and no threads.

Token in, token out. The templates guarantee that between user messages a conversation only grows
at its end (`render(msgs + [parse(g).to_message()]) == render(msgs) + g`), so an episode is one
token stream: the first prompt, then generated turns (loss mask 1) and, between them, the tokens
of the tool results and the next generation prompt (loss mask 0). Only those in-between pieces are
tokenised by us; generated tokens are kept exactly as sampled. Each episode becomes one RolloutBatch
row with `prompt_ids` = the first prompt and `response_ids` = everything after it.

Routing: each generate call records expert ids for its own fed tokens (prompt + response - 1). A
row needs them for every fed token of the whole stream; `Segment.add_turn` takes, from each turn's
record, the positions not covered yet: the newly generated tokens, and the last token of the
previous turn plus the appended tool tokens, which the engine routed while prefilling this turn's
prompt. An episode never ends on appended tokens (results are only appended when another turn
follows), so the record always covers the whole row.

Context budget: a turn starts only when the prompt plus `sampling["max_tokens"]` fits in
`max_total_tokens` (then every request of a generate call has the same max_tokens, and the engine limits
hold). When the next prompt would not fit, `context_strategy` makes room (`context.make_room`) and
the episode continues from the shortened conversation; that is a new token stream (a new
`Segment`), and the row is the last one: tokens before the cut are not trained on, and each use is
counted in the metrics. With strategy "none" the episode ends instead.

An episode also ends at a turn that does not close with the template's end of turn (the engine's
length limit or EOS), or that does not parse: its text cannot continue an append-only stream, and it
has no answer. The reward is `env.score(answer)` (verify, bounded) for the final turn without tool calls, else 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout.agent.context import ContextStrategy, make_room
from rollout.agent.environments.base import Environment
from rollout.agent.messages import Message
from rollout.agent.template import ChatTemplate
from rollout.agent.tokens import encode_text, fits

# Why an episode ended; finish_reason of its row.
STOP, MAX_TURNS, CONTEXT, TRUNCATED, PARSE_ERROR = "stop", "max_turns", "context_budget", "length", "parse_error"


# ---- one token stream --------------------------------------------------------------------------------


class Segment:
    """One append-only token stream with what a RolloutBatch row needs for each token.

    `add_turn` appends a generated turn from its generate record, `add_context` appends tokens we
    wrote (tool results, the next generation prompt). Pure bookkeeping, no engine.
    """

    def __init__(self, prompt_ids: Sequence[int]):
        self.prompt_ids = list(prompt_ids)
        self.response_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.kept: list[list[int] | None] = []  # per response position; None: sampling did not truncate
        self.routing: list[np.ndarray] = []  # chunks covering fed positions [0, routed)
        self.routed = 0
        self.routing_mismatch = 0  # earlier positions whose routing a later prefill recomputed differently
        # Indexer selections as stored in the batch ([positions, dsa_layers * index_topk]) for fed positions from
        # index_topk up to `indexed`; like routing, a later prefill's recomputation of earlier positions is not used.
        self.selections: list[np.ndarray] = []
        self.indexed = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def add_turn(self, prompt: list[int], generated: list[int], logprobs: list[float],
                 kept: list[list[int]] | None, routing: np.ndarray | None,
                 selections: tuple[np.ndarray, int] | None = None) -> None:
        """Append a generated turn; `routing` covers the call's fed tokens, prompt + generated - 1, and
        `selections` (stored rows, index_topk) the call's fed positions from index_topk on."""
        if prompt != self.tokens:
            raise RuntimeError("the engine answered a different prompt than this stream's tokens")
        if len(logprobs) != len(generated) or (kept is not None and len(kept) != len(generated)):
            raise RuntimeError("a generate record has per-token fields of different lengths")
        if routing is not None:
            fed = len(prompt) + len(generated) - 1
            if routing.shape[0] != fed:
                raise RuntimeError(f"routing covers {routing.shape[0]} tokens, the turn fed {fed}")
            if self.routed:
                # The prefill recomputed routing we already hold; count where it changed (a diagnostic).
                before = np.concatenate(self.routing)
                self.routing_mismatch += int((before != routing[: self.routed]).any(axis=(1, 2)).sum())
            self.routing.append(routing[self.routed:])
            self.routed = fed
        if selections is not None:
            rows, k = selections
            fed = len(prompt) + len(generated) - 1
            start = max(self.indexed, k)
            self.selections.append(rows[start - k :] if fed > start else rows[:0])
            self.indexed = max(fed, self.indexed)
        self.response_ids += generated
        self.loss_mask += [1] * len(generated)
        self.logprobs += list(logprobs)
        self.kept += list(kept) if kept is not None else [None] * len(generated)

    def add_context(self, ids: list[int]) -> None:
        """Append tokens the model did not generate: not trained on, no log-prob, not truncated."""
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.kept += [[]] * len(ids)

    def row(self) -> dict:
        """The RolloutBatch fields of this stream (routing as an array [fed tokens, moe_layers, top_k])."""
        if self.routing and self.routed != len(self) - 1:
            raise RuntimeError(f"routing covers {self.routed} tokens, the row feeds {len(self) - 1}")
        truncated = any(k for k, m in zip(self.kept, self.loss_mask, strict=True) if m)
        return dict(
            prompt_ids=self.prompt_ids,
            response_ids=self.response_ids,
            loss_mask=self.loss_mask,
            rollout_logprobs=self.logprobs,
            # An empty kept set reads as "not truncated" in the trainer; those positions are masked anyway.
            sampling_mask=[k or [] for k in self.kept] if truncated else None,
            routed_experts=np.concatenate(self.routing) if self.routing else None,
            indexer_topk=np.concatenate(self.selections) if self.selections else None,
        )


# ---- one episode -------------------------------------------------------------------------------------


@dataclass
class Episode:
    """The conversation, its current token stream and what happened so far."""

    env: Environment
    messages: list[Message]
    segment: Segment
    turns: int = 0
    finish_reason: str = ""
    answer: str | None = None
    parse_error: str | None = None
    segments: int = 1
    routing_mismatch: int = 0  # of streams already cut by context management
    context_records: list[dict] = field(default_factory=list)
    pending: list = field(default_factory=list)  # tool calls of the last turn, to run
    index: int = 0  # its position among the episodes of one `run_episodes` call (its requests' seeds)

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)


def read_turn(episode: Episode, template: ChatTemplate, text: str, max_turns: int) -> None:
    """Parse a generated turn into the conversation; decide whether the episode ends or calls tools."""
    episode.turns += 1
    if not text.endswith(template.end_of_turn):
        episode.finish_reason = TRUNCATED
        return
    parsed = template.parse(text)
    error = parsed.error
    if parsed.ok:
        try:  # a parser more lenient than its renderer must not break the append-only stream later
            template.render([parsed.to_message()], add_generation_prompt=False)
        except ValueError as unrenderable:
            error = str(unrenderable)
    if error:
        episode.parse_error, episode.finish_reason = error, PARSE_ERROR
        return
    episode.messages.append(parsed.to_message())
    if not parsed.tool_calls:
        episode.answer, episode.finish_reason = parsed.content, STOP
    elif episode.turns >= max_turns:
        episode.finish_reason = MAX_TURNS  # no turn would read the results, so the calls are not run
    else:
        episode.pending = list(parsed.tool_calls)


def run_tools(episode: Episode) -> list[Message]:
    """Run the pending calls in order; one tool message per call."""
    calls, episode.pending = episode.pending, []
    return [Message("tool", episode.env.call(c.name, c.arguments), name=c.name) for c in calls]


def append_results(episode: Episode, results: list[Message], template: ChatTemplate, tokenizer: Any,
                   tools: list[dict], max_tokens: int, max_total_tokens: int) -> bool:
    """Append the tool results and the next generation prompt; False when the stream has no room for them.

    The conversation always gets the results; the token stream only when the next turn still fits.
    On False the caller makes room (`restart_episode`) before the episode can go on.
    """
    before = template.render(episode.messages, add_generation_prompt=False, tools=tools)
    episode.messages += results
    after = template.render(episode.messages, add_generation_prompt=True, tools=tools)
    if not after.startswith(before):
        raise RuntimeError(f"template {template.name} rewrote the conversation when tool results were appended")
    appended = encode_text(tokenizer, after[len(before):])
    if not fits(len(episode.segment) + len(appended), max_tokens, max_total_tokens):
        return False
    episode.segment.add_context(appended)
    return True


def restart_episode(episode: Episode, template: ChatTemplate, tokenizer: Any, tools: list[dict], max_tokens: int,
                    max_total_tokens: int, strategy: ContextStrategy,
                    summarize: Callable[[list[Message]], str] | None) -> None:
    """Make room in an overflowing conversation and continue it in a new stream, or end the episode
    (strategy "none", nothing to drop, or still no room for a turn)."""
    if strategy == "none":
        episode.finish_reason = CONTEXT
        return
    messages, record = make_room(episode.messages, strategy, summarize)
    episode.context_records.append(record)
    prompt = template.encode(messages, tokenizer, add_generation_prompt=True, tools=tools)
    if not record["applied"] or not fits(len(prompt), max_tokens, max_total_tokens):
        episode.finish_reason = CONTEXT
        return
    episode.routing_mismatch += episode.segment.routing_mismatch
    episode.messages, episode.segment = messages, Segment(prompt)
    episode.segments += 1


def continue_episode(episode: Episode, results: list[Message], template: ChatTemplate, tokenizer: Any,
                     tools: list[dict], max_tokens: int, max_total_tokens: int, strategy: ContextStrategy,
                     summarize: Callable[[list[Message]], str] | None) -> None:
    """Append the tool results and the next generation prompt, making room first if they do not fit."""
    if not append_results(episode, results, template, tokenizer, tools, max_tokens, max_total_tokens):
        restart_episode(episode, template, tokenizer, tools, max_tokens, max_total_tokens, strategy, summarize)


@dataclass
class Rules:
    """What every episode of one `run_episodes` call plays by."""

    template: ChatTemplate
    tokenizer: Any
    max_turns: int
    max_tokens: int  # of one turn
    max_total_tokens: int  # of a whole stream
    strategy: ContextStrategy
    summarize: Callable[[list[Message]], str] | None


def start_episode(env: Environment, rules: Rules, system_prompt: str | None, index: int = 0) -> Episode:
    """An episode at its first generation prompt: the system prompt (if any) and the environment's task."""
    messages = ([Message("system", system_prompt)] if system_prompt else []) + [Message("user", env.task)]
    prompt = rules.template.encode(messages, rules.tokenizer, add_generation_prompt=True, tools=env.tools)
    if not fits(len(prompt), rules.max_tokens, rules.max_total_tokens):
        raise ValueError(f"a task prompt of {len(prompt)} tokens + sampling.max_tokens={rules.max_tokens} exceeds "
                         f"max_total_tokens={rules.max_total_tokens}")
    return Episode(env, messages, Segment(prompt), index=index)


def episode_row(episode: Episode, prompt_index: int, sample_index: int, policy_version: int) -> dict:
    """The RolloutBatch row of a finished episode: its last stream, scored by the environment."""
    if episode.answer is None:
        reward, reason = 0.0, episode.parse_error or f"no answer ({episode.finish_reason})"
    else:
        reward, reason = episode.env.score(episode.answer)
    return dict(episode.segment.row(), prompt_index=prompt_index, sample_index=sample_index,
                finish_reason=episode.finish_reason, policy_version=policy_version, reward=reward,
                reward_reason=reason)
