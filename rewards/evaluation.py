"""Evaluate one reward on one response, turning every outcome into a RewardResult.

This is what a scoring worker (Ray task or local process) runs. It never raises for anything the
reward does: an exception or a non-finite score becomes 0 with the reason; the deadline is
enforced by whoever runs this, since only a separate process can be stopped reliably.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rewards.registry import RewardFn, RewardResult


@dataclass(frozen=True)
class ScoringJob:
    """One reward applied to one response."""

    reward: RewardFn
    response: str
    sample: dict
    kwargs: dict = field(default_factory=dict)


def as_reward_result(value: object) -> RewardResult:
    """A reward's return value as a RewardResult; raises TypeError/ValueError on anything else."""
    if isinstance(value, RewardResult):
        result = value
    elif isinstance(value, (bool, int, float)):
        result = RewardResult(float(value))
    else:
        raise TypeError(f"reward returned {type(value).__name__}, expected float or RewardResult")
    if not math.isfinite(result.score):
        raise ValueError(f"reward returned a non-finite score {result.score}")
    return result


def evaluate_job(job: ScoringJob) -> RewardResult:
    """The job's reward, or 0 with "raised <Type>: <message>" when it fails."""
    try:
        return as_reward_result(job.reward(job.response, job.sample, **job.kwargs))
    except Exception as exc:  # a broken reward must cost one sample, not the run
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        return RewardResult(0.0, f"raised {type(exc).__name__}: {message}".rstrip(": "))


def timeout_result(timeout_s: float) -> RewardResult:
    return RewardResult(0.0, f"timeout after {timeout_s:g}s")
