"""Sequence packing for SFT: per-sample attention and RoPE in packed rows, and `pack_sft_sequences`.

A packed row must compute, for each of its samples, exactly what that sample computes alone: same logits,
same MoE routing, same gradients, same indexer loss; dense attention and the DSA top-k path alike.
"""

from __future__ import annotations

import pytest
import torch
from test_model import randomized_model  # tests/ is on sys.path (pytest's rootdir-relative import)
from transformers import DeepseekV32Config

from rl.algo.logprobs import token_logprobs
from rl.loop.data import pack_sft_sequences, pad_sft_sequences
from rl.model.presets import preset
from rl.model.transformer import Transformer, segment_attention
from rl.recipes.distill import pack_row_length

INDEX_TOPK = 8
LENGTHS = [14, 21, 10, 17, 12]  # tokens per sample; every sample is longer than index_topk, so top-k selects


def tiny_model(seed: int = 0) -> Transformer:
    """The tiny preset with index_topk below the sample lengths and random weights big enough to matter.

    16 indexer heads, not 4: an index score is exactly 0 where every head's ReLU is 0 (1 in 16 pairs with 4
    heads), and top-k breaks such ties by position, which differs between a packed row and a sample alone.
    The selections would then be equally valid but not equal; with 16 heads exact ties do not occur here.
    """
    fields = preset("tiny", index_topk=INDEX_TOPK, index_n_heads=16, initializer_range=0.15)
    return randomized_model(DeepseekV32Config(**fields), seed=seed)


def samples(lengths=LENGTHS, seed: int = 3) -> tuple[list[list[int]], list[list[int]]]:
    """Token sequences and loss masks (a prompt of 4 tokens masked out, the rest trained)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in lengths]
    masks = [[0] * 4 + [1] * (n - 4) for n in lengths]
    return seqs, masks


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@pytest.fixture(scope="module")
def packed():
    seqs, masks = samples()
    ids, targets, loss_mask, segment_ids = pack_sft_sequences(seqs, masks, max_len=40)
    assert ids.shape[0] < len(seqs)  # several samples do share rows
    return seqs, masks, ids, targets, loss_mask, segment_ids


def alone(seq: list[int]) -> torch.Tensor:
    """The inputs of one sample on its own, [1, n - 1], as `pad_sft_sequences` makes them."""
    return torch.tensor(seq[:-1])[None]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "dsa"])
def test_packed_logits_and_routing_equal_each_sample_alone(model, packed, sparse):
    seqs, _, ids, _, _, segment_ids = packed
    with torch.no_grad():
        out = model(ids, segment_ids=segment_ids, sparse=sparse, return_routing=True)
        logits = model.logits(out.hidden)
        for i, seq in enumerate(seqs):
            assert len(seq) - 1 > INDEX_TOPK  # alone, the DSA path selects top-k too
            ref = model(alone(seq), sparse=sparse, return_routing=True)
            rows, cols = torch.where(segment_ids == i + 1)
            torch.testing.assert_close(logits[rows, cols], model.logits(ref.hidden)[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(out.routing[rows, cols].sort(-1).values, ref.routing[0].sort(-1).values)
    assert logits.abs().max() > 0.1  # not a trivially small comparison


def test_packed_differs_without_segment_ids(model, packed):
    """The check above has teeth: without segment ids the second sample of a row sees the first."""
    seqs, _, ids, _, _, segment_ids = packed
    with torch.no_grad():
        plain = model.logits(model(ids).hidden)
        ref = model.logits(model(alone(seqs[1])).hidden)[0]
    rows, cols = torch.where(segment_ids == 2)
    assert cols[0] > 0  # sample 1 does not start its row
    assert (plain[rows, cols] - ref).abs().max() > 1e-3


def test_one_segment_is_the_plain_causal_model(model):
    ids = torch.randint(3, 60, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for sparse in (False, True):
            plain = model(ids, sparse=sparse).hidden
            one = model(ids, sparse=sparse, segment_ids=torch.ones_like(ids)).hidden
            torch.testing.assert_close(one, plain, atol=1e-5, rtol=1e-5)


def test_segment_positions_and_mask():
    positions, mask = segment_attention(torch.tensor([[1, 1, 2, 2, 2, 0]]))
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask[0].int().tolist() == expected


def test_packed_gradients_equal_sum_of_sample_gradients(packed):
    seqs, masks, ids, targets, loss_mask, segment_ids = packed
    model = tiny_model()  # a fresh copy: gradients accumulate on it

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward()
        # An expert no token of a sample routes to gets no gradient from that sample: count it as zeros.
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    def summed_nll(input_ids, target_ids, weights, **kwargs) -> torch.Tensor:
        logp, _ = token_logprobs(model(input_ids, **kwargs).hidden, model.lm_head.weight, target_ids)
        return -(logp * weights).sum()

    packed_grads = grads(summed_nll(ids, targets, loss_mask, segment_ids=segment_ids))
    total = None
    for seq, mask in zip(seqs, masks, strict=True):
        g = grads(summed_nll(*pad_sft_sequences([seq], [mask])))
        total = g if total is None else {n: total[n] + g[n] for n in total}
    assert sum(g.abs().sum() > 0 for g in total.values()) > 10
    for name in total:
        # Relative to the tensor's largest entry: sums over different token orders round differently.
        scale = total[name].abs().max().item()
        assert (packed_grads[name] - total[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name


def test_packed_sft_loss_equals_padded_sft_loss(model, packed):
    """What the trainer computes: the mean NLL over trained tokens, packed or right-padded."""
    seqs, masks, ids, targets, loss_mask, segment_ids = packed

    def mean_nll(input_ids, target_ids, weights, **kwargs) -> float:
        logp, _ = token_logprobs(model(input_ids, **kwargs).hidden, model.lm_head.weight, target_ids)
        return (-(logp * weights).sum() / weights.sum()).item()

    with torch.no_grad():
        padded = mean_nll(*pad_sft_sequences(seqs, masks))
        packed_loss = mean_nll(ids, targets, loss_mask, segment_ids=segment_ids)
    assert packed_loss == pytest.approx(padded, rel=1e-5)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-warmup", "sparse-stage"])
def test_packed_indexer_loss_is_the_token_weighted_mean_of_sample_losses(model, packed, sparse):
    """The indexer KL is a mean over (unmasked) queries, so packed = sum_i n_i * loss_i / sum_i n_i."""
    seqs, _, ids, _, _, segment_ids = packed
    with torch.no_grad():
        out = model(ids, segment_ids=segment_ids, sparse=sparse, indexer_loss=True, query_mask=segment_ids > 0)
        per_sample = [model(alone(s), sparse=sparse, indexer_loss=True).indexer_loss for s in seqs]
    n = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.float32)
    expected = (torch.stack(per_sample) * n).sum() / n.sum()
    torch.testing.assert_close(out.indexer_loss, expected, atol=1e-6, rtol=1e-5)
    assert expected > 1e-3


# ---- pack_sft_sequences ---------------------------------------------------------------------------


def test_pack_sft_sequences_first_fit_by_hand():
    # Positions needed: 4, 3, 2 (a sample of n tokens takes n - 1). Rows of 6: sample 0 opens row 0 (2 left),
    # sample 1 does not fit there and opens row 1, sample 2 goes back to row 0 (first fit, not next fit).
    seqs = [[10, 11, 12, 13, 14], [20, 21, 22, 23], [30, 31, 32]]
    masks = [[0, 0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1]]
    ids, targets, loss_mask, segment_ids = pack_sft_sequences(seqs, masks, max_len=6)
    assert ids.tolist() == [[10, 11, 12, 13, 30, 31], [20, 21, 22, 0, 0, 0]]
    # Each sample's last input predicts that sample's last token; 13 -> 14, never 13 -> 30.
    assert targets.tolist() == [[11, 12, 13, 14, 31, 32], [21, 22, 23, 0, 0, 0]]
    assert loss_mask.tolist() == [[0, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]]
    assert segment_ids.tolist() == [[1, 1, 1, 1, 3, 3], [2, 2, 2, 0, 0, 0]]


def test_pack_sft_sequences_matches_padding_per_sample():
    seqs, masks = samples()
    ids, targets, loss_mask, segment_ids = pack_sft_sequences(seqs, masks, max_len=40)
    assert ids.shape[1] <= 40
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        p_ids, p_targets, p_mask = pad_sft_sequences([s], [m])
        at = segment_ids == i + 1
        assert torch.equal(ids[at], p_ids[0]) and torch.equal(targets[at], p_targets[0])
        assert torch.equal(loss_mask[at], p_mask[0])
    pad = segment_ids == 0
    assert (loss_mask[pad] == 0).all() and (targets[pad] == 0).all()


def test_pack_sft_sequences_rows_multiple_of_ranks():
    seqs, masks = samples([5, 5, 5])
    ids, _, loss_mask, segment_ids = pack_sft_sequences(seqs, masks, max_len=8, rows_multiple_of=4)
    assert ids.shape == (4, 8)
    assert (segment_ids[2:] == 0).all() and (loss_mask[2:] == 0).all()


def test_pack_sft_sequences_errors_name_the_sample():
    seqs, masks = samples([5, 12, 5])
    with pytest.raises(ValueError, match=r"sequence 1 has 12 tokens \(11 positions\).*10 positions"):
        pack_sft_sequences(seqs, masks, max_len=10)
    pack_sft_sequences(seqs, masks, max_len=11)  # 12 tokens take 11 positions: fits exactly
    with pytest.raises(ValueError, match="sequence 0: 5 tokens but a loss mask of 4"):
        pack_sft_sequences(seqs, [masks[0][:4], *masks[1:]], max_len=20)


def test_pack_row_length():
    seqs, _ = samples([5, 30, 9])  # the longest takes 29 positions
    assert pack_row_length(0, 2048, seqs) == 4 * 29
    assert pack_row_length(0, 64, seqs) == 64  # capped at index_topk: rows stay dense
    assert pack_row_length(0, 29, seqs) == 29  # but never below the longest sample
    assert pack_row_length(0, 8, seqs) == 4 * 29  # samples past index_topk run sparse anyway: no cap
    assert pack_row_length(100, 8, seqs) == 100
    with pytest.raises(ValueError, match=r"sft.pack_length=20: dataset row 1 has 30 tokens"):
        pack_row_length(20, 8, seqs)
