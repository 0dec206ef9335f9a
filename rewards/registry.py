"""The reward registry: configs name rewards; names resolve to functions.

A reward is `fn(response: str, sample: dict, **kwargs) -> float | RewardResult`, where `sample`
is the prompt row ("answer", "tests", "prompt", "domain", ...) and kwargs come from the config.
Built-in rewards are listed by import path so that naming one does not import the others' heavy
dependencies (math-verify, the sandbox). Users add theirs with `@register_reward("name")` or
name them directly by import path ("package.module:function" or "package.module.function").
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
    "exact_match": "rewards.math:exact_match_reward",
    "math_verify": "rewards.math:math_verify_reward",
    "code_tests": "rewards.code:code_tests_reward",
    "logic": "rewards.logic:logic_reward",
    "format": "rewards.format:format_reward",
    "length_penalty": "rewards.format:length_penalty_reward",
}

_registered: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to configs as `name`. Re-registering a name replaces it."""

    def decorate(fn: RewardFn) -> RewardFn:
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
