"""Keep Sampling Mask: the token ids that survived top-k/top-p at each sampled position.

This module is the CUDA path (and what `check_sampling` resolves `logprobs_candidates` with). On
CPU the worker records the kept set inside the engine over the whole vocabulary
(`rollout.engine_extension`), so none of the candidate limits below apply there.

The engine runs with `logprobs_mode="processed_logprobs"`: each returned candidate's log-prob
comes from the distribution the sampler actually drew from, so it is -inf outside the
top-k/top-p kept set. With N candidates per position (the N most likely, plus the sampled token
when it is not among them) the kept set is read off exactly when it is provably inside the N:
  - some candidate is -inf (the kept set ended before the N-th), or
  - top_k > 0 and N >= top_k (the kept set has at most top_k tokens), or
  - N covers the whole vocabulary.
Otherwise part of the kept set may be missing, and we fail rather than return a truncated mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


class SamplingMaskError(ValueError):
    """The returned candidates cannot hold the whole kept set."""


def truncates(top_k: int, top_p: float, vocab_size: int) -> bool:
    """Whether sampling with these settings can drop tokens (else the mask is "all", stored as null)."""
    return (0 < top_k < vocab_size) or top_p < 1.0


def candidates_needed(top_k: int, top_p: float, vocab_size: int, requested: int | None) -> int:
    """How many log-prob candidates to ask the engine for, per sampled position."""
    if not truncates(top_k, top_p, vocab_size):
        return 0  # only the sampled token's log-prob
    if requested is not None:
        return requested
    if 0 < top_k < vocab_size:
        return top_k
    raise SamplingMaskError(
        f"sampling.top_p={top_p} without a top_k: set sampling.logprobs_candidates (up to "
        f"engine.max_logprobs) large enough to hold every token top-p keeps, or set sampling.top_k"
    )


def kept_set(candidates: Mapping[int, float], n_candidates: int, top_k: int, vocab_size: int) -> list[int]:
    """Sorted kept token ids at one position, from {token id: processed log-prob}."""
    kept = sorted(t for t, lp in candidates.items() if lp != -math.inf)
    complete = (
        len(kept) < n_candidates
        or (0 < top_k <= n_candidates)
        or n_candidates >= vocab_size
    )
    if not complete:
        raise SamplingMaskError(
            f"the top-k/top-p kept set has at least {len(kept)} tokens but only "
            f"sampling.logprobs_candidates={n_candidates} candidates were returned, so the sampling mask "
            f"would be truncated: raise sampling.logprobs_candidates (and engine.max_logprobs) or set "
            f"sampling.top_k <= logprobs_candidates (top_k is {top_k})"
        )
    return kept
