"""Synthesized, verifiable, offline environments: hard to solve, easy to verify.

Each kind is a generator from a seed (`make_environment(kind, seed)` rebuilds the same one, so a
dataset row only needs kind and seed). `generate_environments(kind, n, seed)` makes n of a kind,
or of every kind in turn with kind "mixed".
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rollout.agent.environments.base import Environment, ToolError, check_arguments, plain, tool_schema
from rollout.agent.environments.codefix import CodefixEnv, make_codefix_env
from rollout.agent.environments.planner import PlannerEnv, make_planner_env
from rollout.agent.environments.search import SearchEnv, make_search_env

ENVIRONMENTS: dict[str, Callable[[int], Environment]] = {
    "search": make_search_env,
    "planner": make_planner_env,
    "codefix": make_codefix_env,
}

__all__ = ["ENVIRONMENTS", "CodefixEnv", "Environment", "PlannerEnv", "SearchEnv", "ToolError",
           "check_arguments", "generate_environments", "make_codefix_env", "make_environment",
           "make_planner_env", "make_search_env", "plain", "tool_schema"]


def make_environment(kind: str, seed: int) -> Environment:
    if kind not in ENVIRONMENTS:
        raise ValueError(f"unknown environment kind {kind!r}; expected one of {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[kind](seed)


def generate_environments(kind: str, n: int, seed: int) -> list[Environment]:
    """`n` environments of `kind` ("mixed": the kinds in turn), each from its own derived seed.

    The derived seeds come from one generator seeded with `seed`, so the first k environments do
    not depend on n.
    """
    kinds = sorted(ENVIRONMENTS) if kind == "mixed" else [kind]
    rng = random.Random(seed)
    return [make_environment(kinds[i % len(kinds)], rng.getrandbits(31)) for i in range(n)]
