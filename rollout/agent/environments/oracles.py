"""Scripted solvers: play an environment through its tools to an answer that verifies.

`solve(env)` returns the episode after the task as messages (assistant turns with reasoning and one
tool call each, the tool results, and a final assistant turn "answer: ..."). The search and planner
solvers read only the task and the tool results, which shows the tools suffice; the codefix solver
is an oracle in the strict sense: it answers the hidden solution after checking it with `run`.
The episodes use only plain text, so they render in the compact layout: usable as cold-start
demonstrations of thinking-in-tool-use as well as in tests.
"""

from __future__ import annotations

import re

from rollout.agent.environments.base import Environment
from rollout.agent.environments.codefix import CodefixEnv
from rollout.agent.environments.planner import PlannerEnv
from rollout.agent.environments.search import SearchEnv
from rollout.agent.messages import Message, ToolCall


class Episode:
    """Builds the messages of a scripted episode, calling the environment for each tool call."""

    def __init__(self, env: Environment):
        self.env = env
        self.messages: list[Message] = []

    def call(self, reasoning: str, name: str, **arguments: object) -> str:
        self.messages.append(Message("assistant", "", reasoning, [ToolCall(name, dict(arguments))]))
        result = self.env.call(name, arguments)
        self.messages.append(Message("tool", result, name=name))
        return result

    def answer(self, reasoning: str, answer: str) -> list[Message]:
        self.messages.append(Message("assistant", f"answer: {answer}", reasoning))
        return self.messages


def _first(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if not match:
        raise RuntimeError(f"scripted solver expected {pattern!r} in {text!r}")
    return match.group(1)


def solve_search(env: SearchEnv) -> list[Message]:
    episode = Episode(env)
    question = env.task
    if "who founded" in question:
        org = _first(r"who founded ([a-z]+)\?", question)
        results = episode.call(f"who founded {org}", "search", query=f"{org} founded")
        person = _first(rf"\b{org} was founded by ([a-z]+)\.", results)
        return episode.answer(f"{org} was founded by {person}", person)
    org = _first(r"(?:founder of|is) ([a-z]+) (?:born|based)", question)
    if re.search(r"\bbased\?", question):
        results = episode.call(f"first where {org} is based", "search", query=f"{org} based")
        city = _first(rf"\b{org} is based in ([a-z]+)\.", results)
        if "which city" in question:
            return episode.answer(f"{org} is based in {city}", city)
    else:
        results = episode.call(f"first who founded {org}", "search", query=f"{org} founded")
        person = _first(rf"\b{org} was founded by ([a-z]+)\.", results)
        if "what year" in question:
            results = episode.call(f"{person} founded {org}. now the year {person} was born",
                                   "search", query=f"{person} born")
            year = _first(rf"\b{person} was born in (\d+)\.", results)
            return episode.answer(f"{person} was born in {year}", year)
        results = episode.call(f"{person} founded {org}. now the city {person} was born in",
                               "search", query=f"{person} born city")
        city = _first(rf"\b{person} was born in the city of ([a-z]+)\.", results)
        if "which city" in question:
            return episode.answer(f"{person} was born in {city}", city)
    results = episode.call(f"now the land of {city}", "search", query=f"{city} land")
    land = _first(rf"\b{city} lies in the land of ([a-z]+)\.", results)
    return episode.answer(f"{city} lies in {land}", land)


def solve_planner(env: PlannerEnv) -> list[Message]:
    """Cheapest flight per leg and cheapest hotel with enough stars per stay: the cheapest plan."""
    episode = Episode(env)
    home, first, day, nights = re.search(
        r"from ([a-z]+)\. fly to ([a-z]+) on day (\d+) and stay (\d+) nights? there", env.task).groups()
    stays = [(first, int(nights))] + [(c, int(n)) for c, n in
                                      re.findall(r"then fly to ([a-z]+) and stay (\d+) nights?", env.task)]
    min_stars = int(_first(r"at least (\d+) stars", env.task))
    route, leg_day, legs = [home] + [c for c, _ in stays] + [home], int(day), []
    for i, (city, n) in enumerate([*stays, (None, 0)]):
        legs.append((route[i], route[i + 1], leg_day, city))
        leg_day += n
    plan = []
    for origin, dest, leg_day, city in legs:
        listing = episode.call(f"cheapest flight from {origin} to {dest} on day {leg_day}",
                               "flights", origin=origin, dest=dest, day=leg_day)
        flights = re.findall(r"flight (f\d+): [a-z]+ to [a-z]+ on day \d+ costs (\d+)\.", listing)
        plan.append(min(flights, key=lambda f: int(f[1]))[0])
        if city:
            listing = episode.call(f"cheapest hotel in {city} with at least {min_stars} stars",
                                   "hotels", city=city)
            listed = re.findall(r"hotel (h\d+): (\d+) stars, (\d+) per night\.", listing)
            hotels = [(i, int(price)) for i, stars, price in listed if int(stars) >= min_stars]
            plan.append(min(hotels, key=lambda h: h[1])[0])
    return episode.answer("the cheapest choices that meet the stars fit the budget", ", ".join(plan))


def solve_codefix(env: CodefixEnv) -> list[Message]:
    episode = Episode(env)
    episode.call("look at the test cases first", "tests")
    episode.call("check the fix against them", "run", code=env.solution)
    return episode.answer("the fix passes the tests", env.solution)


SOLVERS = {"search": solve_search, "planner": solve_planner, "codefix": solve_codefix}


def solve(env: Environment) -> list[Message]:
    """The scripted episode for `env`; its last message's content verifies to 1.0."""
    return SOLVERS[env.kind](env)
