"""Sparse serving and Keep Indexer Selection without an engine: the cached incremental attention against the
trainer's full-sequence MLA, the slot table, the stored selections and their replay tensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import DeepseekV32Config

from rl.algo.batch import indexer_topk_of, make_rollout_batch, rollout_schema, selection_sentinel
from rl.model.presets import preset
from rl.model.transformer import MLA, rope_frequencies, selection_overlap
from rollout.sparse_serving import SparseAttention, SparseServingState
from trainer.batching import index_selection

TOPK = 4


def _mla(seed: int = 0) -> tuple[MLA, DeepseekV32Config]:
    config = DeepseekV32Config(**preset("tiny", index_topk=TOPK, initializer_range=0.2))
    torch.manual_seed(seed)
    mla = MLA(config).eval()
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.2)
    return mla, config


def _reference(mla: MLA, config: DeepseekV32Config, x: torch.Tensor) -> torch.Tensor:
    """The trainer's attention output over a whole sequence x [T, hidden] (sparse where T > index_topk)."""
    inv_freq, scaling = rope_frequencies(config)
    freqs = torch.arange(x.shape[0]).float()[None, :, None] * inv_freq
    with torch.no_grad():
        out, _, _ = mla(x[None], freqs.cos() * scaling, freqs.sin() * scaling, sparse=True, indexer_loss=False,
                        query_mask=None)
    return out[0]


def test_cached_sparse_attention_equals_the_trainers():
    """Two requests: prefill (one dense-length, one past index_topk), then decode steps batched together, with
    a request finishing and a new one taking its slot: every token's output equals the trainer's."""
    mla, config = _mla()
    inv_freq, scaling = rope_frequencies(config)
    state = SparseServingState(max_slots=2, max_len=32, index_topk=TOPK, capture=True)
    layer = SparseAttention(mla, 0, state, inv_freq, scaling)
    g = torch.Generator().manual_seed(1)
    seqs = {"a": torch.randn(12, config.hidden_size, generator=g), "b": torch.randn(9, config.hidden_size, generator=g),
            "c": torch.randn(7, config.hidden_size, generator=g)}
    # (request, first position, tokens) per step; "b" finishes after step 2 and "c" reuses its slot.
    schedule = [[("a", 0, 3), ("b", 0, 6)], [("a", 3, 1), ("b", 6, 1)], [("a", 4, 1), ("b", 7, 1)],
                [("c", 0, 5), ("a", 5, 1)], [("a", 6, 1), ("c", 5, 1)], [("c", 6, 1), ("a", 7, 1)]]
    outputs = {k: torch.zeros(v.shape[0], config.hidden_size) for k, v in seqs.items()}
    for step, items in enumerate(schedule):
        if step == 3:
            state.release({"b"})
        x = torch.cat([seqs[r][p : p + n] for r, p, n in items])
        positions = torch.cat([torch.arange(p, p + n) for r, p, n in items])
        state.step_source = lambda items=items: ([r for r, _, _ in items], [n for _, _, n in items])
        out = layer(positions, x)
        state.end_step()
        row = 0
        for r, p, n in items:
            outputs[r][p : p + n] = out[row : row + n]
            row += n
    assert state.slot_of["c"] in (0, 1) and len(state.free) == 0
    for r, (p_end) in (("a", 8), ("b", 8), ("c", 7)):
        want = _reference(mla, config, seqs[r][:p_end])
        torch.testing.assert_close(outputs[r][:p_end], want, atol=1e-5, rtol=1e-4)


def test_slots_run_out_with_a_clear_error():
    state = SparseServingState(max_slots=1, max_len=8, index_topk=TOPK, capture=False)
    state.begin_step(["x"], [2], torch.arange(2))
    with pytest.raises(RuntimeError, match="raise engine.max_num_seqs"):
        state.begin_step(["x", "y"], [1, 1], torch.tensor([2, 0]))


def test_selection_overlap_by_hand():
    own = torch.tensor([[[0, -1], [0, 1], [1, 2], [0, 3]]])  # k=2, positions 0..3
    rec = torch.tensor([[[0, -1], [1, 0], [2, 0], [1, 2]]])
    # queries t >= 2 count: t=2 shares {2} of 2 (0.5), t=3 shares nothing (0)
    assert selection_overlap(own, rec, 2).item() == pytest.approx(0.25)
    assert selection_overlap(own, rec, 2, torch.tensor([[1, 1, 1, 0]])).item() == pytest.approx(0.5)
    # A padded query (no record: all -1) is not compared, whatever the model picks there.
    padded = rec.clone()
    padded[0, 3] = -1
    assert selection_overlap(own, padded, 2).item() == pytest.approx(0.5)


def _batch(lengths: list[tuple[int, int]], layers: int, k: int, records: list[np.ndarray | None]) -> pa.RecordBatch:
    schema = rollout_schema(1, 2, 8, dsa_layers=layers, index_topk=k, max_model_len=64)
    rows = [dict(prompt_index=i, sample_index=0, prompt_ids=list(range(1, p + 1)), response_ids=[5] * r,
                 rollout_logprobs=[-1.0] * r, finish_reason="stop", policy_version=0, indexer_topk=rec)
            for i, ((p, r), rec) in enumerate(zip(lengths, records, strict=True))]
    return make_rollout_batch(rows, schema)


def test_stored_selections_round_trip_and_replay_tensor():
    k, layers = 3, 2
    rec = np.array([[[0, 2, 65535], [1, 3, 0]], [[4, 1, 2], [0, 1, 2]]], dtype=np.uint16)  # positions 3, 4
    batch = _batch([(3, 3), (2, 1)], layers, k, [rec.reshape(2, -1), None])
    assert batch.schema.field("indexer_topk").type.value_type.value_type == pa.uint16()
    back = indexer_topk_of(batch, 0)
    assert back.shape == (2, layers, k) and back[0, 0, 2] == -1 and back[1, 0, 0] == 4
    assert selection_sentinel(np.uint16) == 65535
    sel = index_selection(batch, lengths=[5, 2], width=5)
    assert sel.shape == (2, 5, layers, k)
    assert sel[0, 1, 0].tolist() == [1, 0, -1]  # before index_topk: every earlier token
    assert sel[0, 3, 0].tolist() == [0, 2, -1] and sel[0, 4, 1].tolist() == [0, 1, 2]  # the record
    assert sel[1, 4, 0].tolist() == [4, 3, 2]  # padding: the latest positions, a valid set
    short = _batch([(2, 1)], layers, k, [None])
    assert index_selection(short, lengths=[2], width=2) is None  # nothing to replay below index_topk


def test_missing_record_names_the_switch():
    batch = _batch([(3, 3)], 2, 3, [None])
    with pytest.raises(ValueError, match="capture_indexer"):
        index_selection(batch, lengths=[5], width=5)


def test_agent_stream_keeps_selections_across_turns():
    """A multi-turn stream keeps each fed position's selections from the call that first computed them, like
    routing: the second call's prefill recomputes positions the first one already recorded."""
    from rollout.agent.loop import Segment

    k, width = 2, 4
    seg = Segment([1, 2, 3])
    first = np.arange(3 * width).reshape(3, width)  # fed positions 2..4 (3 prompt + 3 generated - 1 = 5 fed)
    seg.add_turn([1, 2, 3], [4, 5, 6], [-1.0] * 3, None, None, (first, k))
    seg.add_context([7])
    second = 100 + np.arange(7 * width).reshape(7, width)  # fed positions 2..8 of the longer call
    seg.add_turn([1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [-1.0] * 3, None, None, (second, k))
    rows = seg.row()["indexer_topk"]
    assert rows.shape == (len(seg) - 1 - k, width)
    np.testing.assert_array_equal(rows[:3], first)  # positions 2..4: the first call's
    np.testing.assert_array_equal(rows[3:], second[3:])  # positions 5..8: the second call's
