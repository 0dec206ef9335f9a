"""Environments: deterministic from a seed, solvable through their tools, strict verifiers, tool
errors as text, and everything the model sees spellable by the tiny character tokenizer."""

from __future__ import annotations

import threading

import pytest

from rl.model.tokenizer import CharTokenizer
from rollout.agent.environments import (
    ENVIRONMENTS,
    environment_specs,
    generate_environments,
    make_codefix_env,
    make_environment,
    make_planner_env,
    make_search_env,
)
from rollout.agent.environments.base import PLAIN_CHARS, Environment, tool_schema
from rollout.agent.environments.oracles import solve
from rollout.agent.messages import Message
from rollout.agent.template import CompactTemplate, DeepSeekV32Template


@pytest.fixture(scope="module")
def sandbox():
    """Skip the codefix tests on hosts where the sandbox cannot run (no root, no pyseccomp)."""
    from rewards.sandbox import SandboxUnavailable, run_in_sandbox

    try:
        run_in_sandbox("print(1)")
    except SandboxUnavailable as error:
        pytest.skip(f"sandbox unavailable: {error}")


def kinds_and_seeds(codefix_seeds: int = 2) -> list[tuple[str, int, int]]:
    """(kind, seed, difficulty) cases; codefix runs the sandbox, so it gets fewer."""
    return ([("search", s, 1 + s % 3) for s in range(12)] + [("planner", s, 1 + s % 3) for s in range(12)]
            + [("codefix", s, 1 + s % 3) for s in range(codefix_seeds)])


def is_plain(text: str) -> bool:
    return set(text) <= PLAIN_CHARS


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("kind", sorted(ENVIRONMENTS))
def test_same_seed_same_environment(kind):
    a, b = make_environment(kind, 7), make_environment(kind, 7)
    assert (a.task, a.tools, a.seed) == (b.task, b.tools, 7)
    tasks = {make_environment(kind, s).task for s in range(6)}
    assert len(tasks) >= 5  # different seeds give different tasks


def test_same_seed_same_hidden_state_and_tool_results():
    a, b = make_search_env(3), make_search_env(3)
    assert a.documents == b.documents and a.answer == b.answer
    assert a.call("search", {"query": "founded"}) == b.call("search", {"query": "founded"})
    p, q = make_planner_env(3), make_planner_env(3)
    assert p.flights == q.flights and p.hotels == q.hotels and p.budget == q.budget


def test_generate_environments():
    envs = generate_environments("planner", 5, seed=1)
    assert [e.kind for e in envs] == ["planner"] * 5
    assert [e.task for e in generate_environments("planner", 3, seed=1)] == [e.task for e in envs[:3]]
    assert [e.task for e in generate_environments("planner", 5, seed=2)] != [e.task for e in envs]
    mixed = generate_environments("mixed", 6, seed=0)
    assert [e.kind for e in mixed] == ["codefix", "planner", "search"] * 2
    rebuilt = make_environment(mixed[1].kind, mixed[1].seed)
    assert rebuilt.task == mixed[1].task  # a dataset row needs only kind and seed
    with pytest.raises(ValueError):
        generate_environments("chess", 1, seed=0)


@pytest.mark.parametrize("kind", sorted(ENVIRONMENTS))
def test_tasks_and_tools_are_spellable_by_the_tiny_tokenizer(kind):
    for env in generate_environments(kind, 5, seed=11):
        assert is_plain(env.task), env.task
        for tool in env.tools:
            assert {"name", "description", "parameters"} <= set(tool)
            assert tool["parameters"]["type"] == "object"
            assert set(tool["parameters"]["required"]) <= set(tool["parameters"]["properties"])
        CharTokenizer().encode(CompactTemplate().render([Message("user", env.task)], tools=env.tools))


# ---------------------------------------------------------------- the scripted solver


@pytest.mark.parametrize("kind, seed, difficulty", kinds_and_seeds(codefix_seeds=3))
def test_scripted_solver_verifies(kind, seed, difficulty, request):
    if kind == "codefix":
        request.getfixturevalue("sandbox")
    env = make_environment(kind, seed, difficulty)
    episode = solve(env)
    assert env.verify(episode[-1].content) == 1.0
    assert env.tool_calls == sum(len(m.tool_calls) for m in episode) and env.tool_errors == 0
    assert all(is_plain(m.content) for m in episode if m.role == "tool")


@pytest.mark.parametrize("kind, seed, difficulty", kinds_and_seeds(codefix_seeds=1))
def test_solved_episode_renders_and_parses_in_both_layouts(kind, seed, difficulty, request):
    """The tiny model could read the episode, and its own turns in it parse back exactly."""
    if kind == "codefix":
        request.getfixturevalue("sandbox")
    env = make_environment(kind, seed, difficulty)
    conversation = [Message("user", env.task), *solve(env)]
    for template in (CompactTemplate(), DeepSeekV32Template()):
        for i, message in enumerate(conversation):
            if message.role == "assistant":
                before = template.render(conversation[:i])
                turn = template.render(conversation[:i + 1])[len(before):]
                assert template.parse(turn).to_message() == message
    CharTokenizer().encode(CompactTemplate().render(conversation, tools=env.tools))


# ---------------------------------------------------------------- verifiers


def test_search_verifier_is_exact():
    env = make_search_env(0)
    assert env.verify(f"answer: {env.answer}") == 1.0
    assert env.verify(f"i looked it up. answer: {env.answer.upper()}.") == 1.0
    assert env.verify("answer: nobody") == 0.0
    assert env.verify(f"answer: {env.answer} or maybe something else") == 0.0
    assert env.verify("") == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_search_needs_more_than_one_hop(seed):
    """No document names both the question's organisation and the answer."""
    env = make_search_env(seed)
    org = next(o for o in env.founder if f" {o} " in f" {env.question} ")
    assert not [d for d in env.documents if {org, env.answer} <= set(d.rstrip(".").split())]


def test_difficulty_sets_hops_stays_and_depth():
    for seed in range(10):
        easy, hard = make_search_env(seed, 1), make_search_env(seed, 3)
        searches = [len([m for m in solve(env) if m.tool_calls]) for env in (easy, hard)]
        assert searches == [1, 3], (easy.question, hard.question)
        assert len(easy.documents) < len(hard.documents)
        assert {len(name) for name in [*easy.founder, *easy.born_year, *easy.land_of]} == {4}
    for difficulty in (1, 2, 3):
        env = make_planner_env(5, difficulty)
        assert len(env.legs) == difficulty + 1 and len(env.nights) == difficulty
        answer = solve(env)[-1].content
        assert len(answer.removeprefix("answer: ").split(", ")) == 2 * difficulty + 1 and env.verify(answer) == 1.0
    depth_one = make_codefix_env(0, 1).solution.removeprefix("def f(x, y): return ")
    assert "(" not in depth_one or depth_one.startswith(("max(", "min(")), depth_one
    with pytest.raises(ValueError, match="difficulty 1, 2 or 3"):
        make_environment("search", 0, 4)


def test_planner_verifier_checks_every_constraint():
    env = make_planner_env(4)
    plan = solve(env)[-1].content
    assert env.verify(plan) == 1.0
    ids = plan.removeprefix("answer: ").split(", ")
    trap = next(i for i, h in env.hotels.items() if h.city == env.legs[0][1] and h.stars < env.min_stars)
    with_trap = ", ".join([ids[0], trap, *ids[2:]])
    assert env.verify(with_trap) == 0.0
    assert any("stars" in v for v in env.violations(with_trap))
    swapped = ", ".join([ids[0], ids[3], ids[2], ids[1], ids[4]])
    assert any("not in" in v for v in env.violations(swapped))
    wrong_day = next(i for i, f in env.flights.items() if (f.origin, f.dest, f.day) != env.legs[0])
    assert any("is not" in v for v in env.violations(", ".join([wrong_day, *ids[1:]])))
    assert env.verify(", ".join(ids[:4])) == 0.0
    assert env.verify(", ".join(["f999", *ids[1:]])) == 0.0


def test_planner_budget_is_binding():
    """The most expensive valid choices break the budget: the planner has to compare prices."""
    env = make_planner_env(2)
    priciest = []
    for k, (origin, dest, day) in enumerate(env.legs):
        flights = [i for i, f in env.flights.items() if (f.origin, f.dest, f.day) == (origin, dest, day)]
        priciest.append(max(flights, key=lambda i: env.flights[i].price))
        if k < len(env.nights):
            hotels = [i for i, h in env.hotels.items() if h.city == dest and h.stars >= env.min_stars]
            priciest.append(max(hotels, key=lambda i: env.hotels[i].price))
    assert env.violations(", ".join(priciest)) and "budget" in env.violations(", ".join(priciest))[-1]


@pytest.mark.usefixtures("sandbox")
def test_codefix_verifier_runs_the_hidden_tests():
    env = make_codefix_env(0)
    assert env.verify(env.solution) == 1.0
    assert env.verify(f"here it is:\n```python\n{env.solution}\n```") == 1.0
    assert env.verify(env.buggy) == 0.0
    assert env.verify("def f(x, y) return") == 0.0
    assert env.verify("def f(x, y):\n    while True: pass") == 0.0
    assert env.verify("import os\nprint(os.getcwd())") == 0.0


# ---------------------------------------------------------------- tool errors


@pytest.mark.parametrize("kind, name, arguments, expected", [
    ("search", "browse", {"query": "x"}, "there is no tool browse"),
    ("search", "search", {}, "needs the argument query"),
    ("search", "search", {"query": "x", "limit": 3}, "has no argument limit"),
    ("search", "search", "zorb", "must be key=value pairs"),
    ("planner", "flights", {"origin": "x", "dest": "y", "day": "soon"}, "must be a whole number"),
    ("planner", "flights", {"origin": "nowhere", "dest": "y", "day": 1}, "there is no city nowhere"),
    ("planner", "hotels", {"city": ["a"]}, "must be text"),
    ("codefix", "tests", {"verbose": 1}, "has no argument verbose"),
])
def test_bad_tool_calls_return_error_text(kind, name, arguments, expected):
    env = make_environment(kind, 1)
    result = env.call(name, arguments)
    assert result.startswith("error: ") and expected in result, result
    assert is_plain(result) and env.tool_errors == 1


@pytest.mark.usefixtures("sandbox")
def test_codefix_run_reports_broken_and_wrong_code():
    env = make_codefix_env(1)
    assert env.call("run", {"code": "def f(x, y) return x"}).startswith("error: the code does not define f")
    assert env.call("run", {"code": "def f(x, y): return 1/0"}).endswith("but is zerodivisionerror.")
    report = env.call("run", {"code": env.buggy})
    assert report.startswith(("0 of 3", "1 of 3", "2 of 3")) and "should be" in report
    assert env.call("run", {"code": env.solution}) == "3 of 3 tests pass."


def test_integer_arguments_spelled_as_text_are_accepted():
    env = make_planner_env(0)
    origin, dest, day = env.legs[0]
    by_int = env.call("flights", {"origin": origin, "dest": dest, "day": day})
    assert by_int.startswith("flight f")
    assert env.call("flights", {"origin": origin, "dest": dest, "day": str(day)}) == by_int


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_search_oracle_solves_many_worlds(difficulty):
    """Names never collide with the search tool's stop words or with the question's keywords."""
    for kind, seed in environment_specs("search", 300, seed=difficulty):
        env = make_environment(kind, seed, difficulty)
        assert env.verify(solve(env)[-1].content) == 1.0, env.task
        if difficulty > 1:  # no document names both the question's organisation and the answer
            org = next(o for o in env.founder if f" {o} " in f" {env.question} ")
            assert not [d for d in env.documents if {org, env.answer} <= set(d.rstrip(".").split())], env.task


class Faulty(Environment):
    """An environment with bugs of its own: a tool that crashes, one that hangs, a verifier that does either."""

    kind = "faulty"
    time_limit_s = 0.3

    def __init__(self, verifier: str):
        tools = [tool_schema(n, "a tool") for n in ("crash", "hang", "fine")]
        super().__init__(0, "do it", tools, difficulty=1)
        self.verifier = verifier

    def handlers(self):
        def hang():
            threading.Event().wait(30)

        return {"crash": lambda: 1 / 0, "hang": hang, "fine": lambda: "ok"}

    def verify(self, final_answer):
        if self.verifier == "crash":
            raise KeyError("hidden state")
        if self.verifier == "hang":
            threading.Event().wait(30)
        return 1.0


def test_a_crashing_or_hanging_tool_or_verifier_never_stalls_the_episode():
    env = Faulty("crash")
    assert env.call("crash", {}).startswith("error: tool crash failed: zerodivisionerror")
    assert env.call("hang", {}).startswith("error: tool hang failed: timeouterror")
    assert env.call("fine", {}) == "ok"  # the episode goes on
    assert (env.tool_calls, env.tool_errors) == (3, 2)
    assert env.score("x") == (0.0, "verifier failed: KeyError: 'hidden state'")
    reward, reason = Faulty("hang").score("x")
    assert reward == 0.0 and reason.startswith("verifier failed: TimeoutError")
    assert Faulty("ok").score("x") == (1.0, "")
