"""Score responses with a weighted sum of named rewards, in parallel, never failing the run.

Rule: for each response i, score_i = sum_j weight_j * reward_j(response_i, sample_i, **kwargs_j).
A reward that raises, returns a non-number or passes `timeout_s` contributes 0; the combined
reason lists "<name>: <why>" for every reward that explains its score (failures included) and
is "" when none does.

Where each (response, reward) job runs: a pure reward (rewards.registry: `pure_reward`, e.g. exact_match,
format) runs in this process, one plain call per job, since a string comparison costs microseconds and a Ray
task per sample costs milliseconds; its failures are caught the same way. Every other reward (math_verify,
code_tests, user rewards unless registered pure) runs as Ray tasks or in local worker processes, one job per
worker call, at most `max_concurrency` at once, each under a hard, process-level deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rewards.evaluation import ScoringJob, evaluate_job
from rewards.registry import RewardResult, get_reward, is_pure_reward


@dataclass(frozen=True)
class RewardSpec:
    """A reward as a config names it: registry name or import path, weight, keyword arguments."""

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


def combine(specs: list[RewardSpec], results: list[RewardResult]) -> RewardResult:
    """Weighted sum of one response's reward results, with per-reward components and reasons."""
    score = sum(spec.weight * result.score for spec, result in zip(specs, results, strict=True))
    reasons = [f"{spec.name}: {result.reason}" for spec, result in zip(specs, results, strict=True)
               if result.reason]
    components = {spec.name: result.score for spec, result in zip(specs, results, strict=True)}
    return RewardResult(score, "; ".join(reasons), components)


def score_responses(
    responses: list[str],
    samples: list[dict],
    specs: list[RewardSpec],
    timeout_s: float = 10.0,
    max_concurrency: int = 2,
    use_ray: bool = True,
) -> list[RewardResult]:
    """One combined RewardResult per response; see the module rule."""
    if len(responses) != len(samples):
        raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
    if not specs:
        raise ValueError("no rewards to score with")
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    rewards = [get_reward(spec.name) for spec in specs]
    pure = [is_pure_reward(reward) for reward in rewards]
    jobs = [ScoringJob(reward, response, sample, dict(spec.kwargs))
            for response, sample in zip(responses, samples, strict=True)
            for spec, reward in zip(specs, rewards, strict=True)]
    n = len(specs)
    # Pure rewards here, in order; the others in workers under their deadlines.
    results: list[RewardResult | None] = [evaluate_job(job) if pure[k % n] else None for k, job in enumerate(jobs)]
    isolated = [k for k in range(len(jobs)) if not pure[k % n]]
    if isolated:
        if use_ray:
            from rewards.ray_pool import run_jobs_with_ray as run_jobs
        else:
            from rewards.process_pool import run_jobs_in_processes as run_jobs
        for k, result in zip(isolated, run_jobs([jobs[k] for k in isolated], timeout_s, max_concurrency),
                             strict=True):
            results[k] = result
    return [combine(specs, results[i * n:(i + 1) * n]) for i in range(len(responses))]
