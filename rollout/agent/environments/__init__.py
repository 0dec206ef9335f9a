"""Synthesized, verifiable, offline environments: hard to solve, easy to verify.

Each kind is a generator from a seed and a difficulty (1 to 3: hops of a search question, stays of
a trip, depth of the buggy expression); `make_environment(kind, seed, difficulty)` rebuilds the
same one, so a dataset row only needs kind and seed. `generate_environments(kind, n, seed)` makes
n of a kind, or of every kind in turn with kind "mixed". A new kind is one Environment subclass
(see base.py) and an entry in ENVIRONMENTS.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rollout.agent.environments.base import Environment, ToolError, check_arguments, plain, tool_schema
from rollout.agent.environments.codefix import CodefixEnv, make_codefix_env
from rollout.agent.environments.planner import PlannerEnv, make_planner_env
from rollout.agent.environments.search import SearchEnv, make_search_env

ENVIRONMENTS: dict[str, Callable[[int, int], Environment]] = {
    "search": make_search_env,
    "planner": make_planner_env,
    "codefix": make_codefix_env,
}

__all__ = ["ENVIRONMENTS", "CodefixEnv", "Environment", "PlannerEnv", "SearchEnv", "ToolError",
           "check_arguments", "environment_specs", "generate_environments", "make_codefix_env", "make_environment",
           "make_planner_env", "make_search_env", "plain", "tool_schema"]


def make_environment(kind: str, seed: int, difficulty: int = 2) -> Environment:
    if kind not in ENVIRONMENTS:
        raise ValueError(f"unknown environment kind {kind!r}; expected one of {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[kind](seed, difficulty)


def environment_specs(kind: str, n: int, seed: int) -> list[tuple[str, int]]:
    """(kind, seed) of n environments of `kind` ("mixed": the kinds in turn): a dataset of environments.

    The derived seeds come from one generator seeded with `seed`, so the first k do not depend on n.
    """
    if kind != "mixed" and kind not in ENVIRONMENTS:
        raise ValueError(f"unknown environment kind {kind!r}; expected mixed or one of {sorted(ENVIRONMENTS)}")
    kinds = sorted(ENVIRONMENTS) if kind == "mixed" else [kind]
    rng = random.Random(seed)
    return [(kinds[i % len(kinds)], rng.getrandbits(31)) for i in range(n)]


def generate_environments(kind: str, n: int, seed: int, difficulty: int = 2) -> list[Environment]:
    """The environments of `environment_specs(kind, n, seed)`, built at `difficulty`."""
    return [make_environment(k, s, difficulty) for k, s in environment_specs(kind, n, seed)]
