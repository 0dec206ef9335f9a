"""RolloutBatch <-> arrow and -> training tensors: every field lands at the right position."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from rl.algo.batch import make_rollout_batch, rollout_schema, routing_dtype, routing_of, with_columns
from trainer.batching import to_train_tensors


def rows():
    rng = np.random.default_rng(0)
    return [
        dict(prompt_index=0, sample_index=0, prompt_ids=[1, 5, 6], response_ids=[7, 8, 2],
             rollout_logprobs=[-0.1, -0.2, -0.3], sampling_mask=[[7, 9], [8, 3, 4], [2]],
             routed_experts=rng.integers(0, 8, (5, 2, 2)), loss_mask=None, finish_reason="stop", policy_version=3),
        dict(prompt_index=0, sample_index=1, prompt_ids=[1, 5, 6], response_ids=[9],
             rollout_logprobs=[-1.5], sampling_mask=None,
             routed_experts=rng.integers(0, 8, (3, 2, 2)), loss_mask=[1], finish_reason="length", policy_version=3),
    ]


def test_arrow_roundtrip_keeps_routing_and_types():
    schema = rollout_schema(moe_layers=2, top_k=2, n_routed_experts=8)
    r = rows()
    batch = make_rollout_batch(r, schema)
    assert batch.schema.field("routed_experts").type.value_type.value_type == pa.uint8()
    assert np.array_equal(routing_of(batch, 0), r[0]["routed_experts"])
    assert routing_of(batch, 1).shape == (3, 2, 2)
    assert batch.column("sampling_mask")[1].as_py() is None
    assert batch.column("reward").to_pylist() == [0.0, 0.0]
    batch = with_columns(batch, advantage=[0.5, -0.5])
    assert batch.column("advantage").to_pylist() == [0.5, -0.5]
    assert routing_dtype(256) == np.uint8 and routing_dtype(257) == np.uint16


def test_wrong_routing_width_is_an_error():
    schema = rollout_schema(moe_layers=3, top_k=2, n_routed_experts=8)
    with pytest.raises(ValueError, match="6"):
        make_rollout_batch(rows(), schema)


def test_train_tensors_positions():
    batch = with_columns(make_rollout_batch(rows(), rollout_schema(2, 2, 8)), advantage=[1.0, -1.0])
    t = to_train_tensors(batch, top_k=2, with_routing=True, with_mask=True)
    # Row 0: fed [1,5,6,7,8], predicts [5,6,7,8,2]; response tokens are targets 2..4.
    assert t.input_ids[0].tolist() == [1, 5, 6, 7, 8]
    assert t.targets[0].tolist() == [5, 6, 7, 8, 2]
    assert t.response_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert torch.allclose(t.old_logp[0], torch.tensor([0, 0, -0.1, -0.2, -0.3]))
    assert t.kept_ids[0, 2, :2].tolist() == [7, 9] and t.kept_ids[0, 3].tolist() == [8, 3, 4]
    assert (t.kept_ids[0, :2] == -1).all() and (t.kept_ids[1] == -1).all()
    # Row 1 is shorter: padded, its response is the single target at position 2.
    assert t.input_ids[1].tolist() == [1, 5, 6, 0, 0] and t.response_mask[1].tolist() == [0, 0, 1, 0, 0]
    assert torch.equal(t.routing[0], torch.from_numpy(rows()[0]["routed_experts"]).long())
    assert t.advantages.tolist() == [1.0, -1.0]


def test_routing_length_mismatch_is_an_error():
    r = rows()
    r[1]["routed_experts"] = r[1]["routed_experts"][:2]
    batch = make_rollout_batch(r, rollout_schema(2, 2, 8))
    with pytest.raises(ValueError, match="row 1: routing covers 2 tokens, expected 3"):
        to_train_tensors(batch, top_k=2, with_routing=True, with_mask=True)
