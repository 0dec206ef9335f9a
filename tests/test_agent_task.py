"""The agent domain of `keel train` without engines: config checks, oracle demonstrations as SFT tensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl.loop.agent_task import AgentTask, demonstration
from rl.loop.config import ConfigError, load_config
from rl.model.tokenizer import CharTokenizer
from rollout.agent.environments import make_environment
from rollout.agent.environments.oracles import solve
from rollout.agent.messages import Message
from rollout.agent.template import CompactTemplate

AGENT = Path(__file__).parent.parent / "configs" / "agent.yaml"


def test_agent_config_loads_and_bad_values_name_their_key():
    cfg = load_config(AGENT)
    assert cfg.agent.enabled and cfg.agent.max_total_tokens <= cfg.rollout.engine.max_model_len
    assert cfg.agent.schedule == "independent"
    for override, match in [
        ("agent.environment=chess", r"agent.environment='chess'"),
        ("agent.difficulty=5", r"agent.difficulty=5"),
        ("agent.context_strategy=forget", r"agent.context_strategy='forget'"),
        ("agent.max_total_tokens=4096", r"agent.max_total_tokens=4096 exceeds rollout.engine.max_model_len"),
        ("agent.template=chatml", r"agent.template='chatml'"),
        ("agent.schedule=async", r"agent.schedule='async': choose one of \['independent', 'rounds'\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(AGENT, [override])


@pytest.mark.parametrize("kind, difficulty", [("search", 1), ("search", 3), ("planner", 1)])
def test_demonstration_trains_exactly_the_assistant_turns(kind, difficulty):
    template, tokenizer = CompactTemplate(), CharTokenizer()
    env = make_environment(kind, 3, difficulty)
    conversation = [Message("user", env.task), *solve(env)]
    ids, mask = demonstration(conversation, template, tokenizer, env.tools)

    assert tokenizer.decode(ids) == template.render(conversation, add_generation_prompt=False, tools=env.tools)
    assert ids[0] == tokenizer.bos_id and len(mask) == len(ids)
    turns = []
    for i, message in enumerate(conversation):
        if message.role == "assistant":
            prompt = template.render(conversation[:i], tools=env.tools)
            turns.append(template.render(conversation[: i + 1], add_generation_prompt=False,
                                         tools=env.tools)[len(prompt):])
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "".join(turns)  # every generated character, tool results and templates excluded
    assert all(turn.endswith("|") for turn in turns)


def test_sft_tensors_shift_the_mask_with_the_targets():
    cfg = load_config(AGENT, ["agent.train_size=8"])
    task = AgentTask(cfg, CharTokenizer())
    input_ids, targets, mask = task.sft_tensors([0, 1, 2])
    assert input_ids.shape == targets.shape == mask.shape and input_ids.shape[0] == 3
    for row in range(3):
        env = task.environment(task.train_specs[row])
        ids, m = demonstration([Message("user", env.task), *solve(env)], task.template, task.tokenizer, env.tools)
        n = len(ids) - 1
        assert input_ids[row, :n].tolist() == ids[:-1] and targets[row, :n].tolist() == ids[1:]
        assert mask[row, :n].tolist() == [float(x) for x in m[1:]] and mask[row, n:].sum() == 0


def test_oracle_episode_over_the_budget_is_refused():
    cfg = load_config(AGENT, ["agent.environment=planner", "agent.difficulty=3", "agent.train_size=4",
                              "agent.max_total_tokens=300"])
    with pytest.raises(ValueError, match="exceeds agent.max_total_tokens=300"):
        AgentTask(cfg, CharTokenizer()).sft_tensors([0])


def test_train_and_eval_environments_differ():
    task = AgentTask(load_config(AGENT), CharTokenizer())
    assert len(task.train_specs) == 4000 and len(task.eval_specs) == 64
    assert not set(task.train_specs) & set(task.eval_specs)


def test_cut_demonstrations_train_the_answer_after_the_cut_the_loop_makes():
    cfg = load_config(AGENT, ["agent.train_size=8", "agent.difficulty=2", "agent.sft_cut_demos=true"])
    task = AgentTask(cfg, CharTokenizer())
    template, tokenizer = task.template, task.tokenizer
    input_ids, targets, mask = task.sft_tensors([0])
    assert input_ids.shape[0] == 2  # the whole episode, then its answer turn after discard_75
    env = task.environment(task.train_specs[0])
    conversation = [*task._messages(env), *solve(env)]
    # Two search rounds: discard_75 drops the first (the call and its result) and keeps the second.
    assert [m.role for m in conversation] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    cut = [conversation[0], *conversation[3:]]
    prompt = template.render(cut[:-1], tools=env.tools)
    text = template.render(cut, add_generation_prompt=False, tools=env.tools)
    trained = tokenizer.decode([t for t, m in zip(targets[1].tolist(), mask[1].tolist(), strict=True) if m])
    assert trained == text[len(prompt):]  # only the answer turn: the kept round is context
    n = int(mask[1].nonzero().max()) + 2  # the row's token count before padding
    assert tokenizer.decode(input_ids[1, : n - 1].tolist() + [int(targets[1, n - 2])]) == text
    with pytest.raises(ConfigError, match="sft_cut_demos needs"):
        load_config(AGENT, ["agent.sft_cut_demos=true", "agent.eval_context_strategy=summary"])
