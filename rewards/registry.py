"""The reward registry: configs name rewards; names resolve to functions.

A reward is `fn(response: str, sample: dict, **kwargs) -> float | RewardResult`, where `sample`
is the prompt row ("answer", "tests", "prompt", "domain", ...) and kwargs come from the config.
Built-in rewards are listed by import path so that naming one does not import the others' heavy
dependencies (math-verify, the sandbox). Users add theirs with `@register_reward("name")` or
name them directly by import path ("package.module:function" or "package.module.function").

Pure rewards: a reward marked pure (`@pure_reward`, or `register_reward(name, pure=True)`) promises to be a
deterministic function of (response, sample, kwargs) that does no I/O, keeps no state and runs in time bounded
by a small function of the response's length (string operations, regexes, small-number arithmetic: no sympy,
no code execution, no network). rewards.scoring evaluates pure rewards in the calling process, with no deadline
and no worker; every other reward (user rewards by default) runs in its own worker under a deadline. Built-in
pure rewards: exact_match, format, length_penalty, logic. Not pure: math_verify (sympy can run for minutes) and
code_tests (runs the response in the sandbox).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RewardResult:
    """A score and, when something went wrong or needs explaining, why.

    `components` holds the per-reward scores when this result combines several rewards.
    """

    score: float
    reason: str = ""
    components: dict[str, float] = field(default_factory=dict)


RewardFn = Callable[..., "float | RewardResult"]

BUILTIN_REWARDS: dict[str, str] = {
    "exact_match": "rewards.math:exact_match_reward",  # pure
    "math_verify": "rewards.math:math_verify_reward",
    "code_tests": "rewards.code:code_tests_reward",
    "logic": "rewards.logic:logic_reward",  # pure
    "format": "rewards.format:format_reward",  # pure
    "length_penalty": "rewards.format:length_penalty_reward",  # pure
}
# The built-ins whose functions carry the `pure_reward` mark (tests/test_rewards_registry.py checks the marks).
PURE_BUILTINS = frozenset({"exact_match", "logic", "format", "length_penalty"})

_registered: dict[str, RewardFn] = {}

PURE_ATTRIBUTE = "keel_pure_reward"  # set on a reward function by `pure_reward`


def pure_reward(fn: RewardFn) -> RewardFn:
    """Decorator: mark `fn` pure (see the module docstring), so scoring runs it in process, without a worker."""
    setattr(fn, PURE_ATTRIBUTE, True)
    return fn


def is_pure_reward(fn: RewardFn) -> bool:
    """True when `fn` was marked with `pure_reward` (or registered with pure=True)."""
    return getattr(fn, PURE_ATTRIBUTE, False) is True


def register_reward(name: str, pure: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to configs as `name`. Re-registering a name replaces it.

    pure=True also marks it pure (`pure_reward`): only for rewards that keep that promise, since a pure reward
    runs in the training driver's process without a deadline."""

    def decorate(fn: RewardFn) -> RewardFn:
        if pure:
            pure_reward(fn)
        _registered[name] = fn
        return fn

    return decorate


def import_from_path(path: str) -> Any:
    """The object at "pkg.mod:attr" or "pkg.mod.attr"."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"not an import path: {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get_reward(name_or_import_path: str) -> RewardFn:
    """The reward function for a registered name, a built-in name, or an import path."""
    if name_or_import_path in _registered:
        return _registered[name_or_import_path]
    path = BUILTIN_REWARDS.get(name_or_import_path, name_or_import_path)
    if "." not in path and ":" not in path:
        known = sorted(set(_registered) | set(BUILTIN_REWARDS))
        raise KeyError(f"unknown reward {name_or_import_path!r}; known: {known} or an import path")
    fn = import_from_path(path)
    if not callable(fn):
        raise TypeError(f"reward {name_or_import_path!r} resolves to a non-callable {fn!r}")
    return fn


def available_rewards() -> list[str]:
    """Names a config may use without an import path."""
    return sorted(set(_registered) | set(BUILTIN_REWARDS))
