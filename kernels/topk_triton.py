"""Triton exact top-k for DSA: per query, the k largest scores' positions, by radix select.

Contract: `kernels.topk.topk_indices_reference` (scores [B, T, S] fp32, -inf = not selectable; out
[B, T, min(k, S)] int64 with the selected positions first and -1 in the unused slots). The selected
*set* equals torch.topk's up to ties; slots are in position order, not score order (DSA only uses
the set).

Algorithm (one program per query row; the row never needs sorting):
1. Map each fp32 score x to an unsigned key that orders like x:
       key = ~bits(x)               if x < 0   (flip all bits: larger magnitude -> smaller key)
       key = bits(x) | 0x80000000   if x >= 0  (positives above every negative)
   -inf (and padding past S) gets key 0, which no finite score reaches, and is never selected.
2. Radix select the n-th largest key theta, n = min(k, #selectable): RADIX_BITS bits per pass from
   the top, each pass a histogram (tl.histogram) of the next digit over the keys that match the
   prefix fixed so far; the digit whose reverse cumulative count crosses the remaining rank is kept.
   After 32 / RADIX_BITS passes theta is exact, and `need_eq` is how many keys equal to theta the
   selection still needs (ties).
3. One compaction pass writes every position with key > theta and the first `need_eq` positions
   with key == theta (a running prefix sum assigns output slots), so exactly n slots are filled.
Reads of the row: 32 / RADIX_BITS + 1 (5 for 8-bit digits); the row (<= 512 KiB at 128K) stays in
L2 between passes at full occupancy. No sort, no [T, S] scratch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ordered_key(x, valid):
    """Order-preserving uint32 key of fp32 x (see module docstring); 0 where not valid or x == -inf."""
    bits = x.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) != 0
    key = tl.where(negative, ~bits, bits | 0x80000000)
    return tl.where(valid & (x != float("-inf")), key, 0)


@triton.jit
def _topk_kernel(
    scores_ptr, out_ptr,
    T, S, K,
    s_sb, s_st, s_ob, s_ot,
    BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """Indices of the min(K, #finite) largest scores of row (b, t), in position order, into out[b, t, :]."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = scores_ptr + b * s_sb + t * s_st
    n_bins: tl.constexpr = 1 << RADIX_BITS
    bins = tl.arange(0, n_bins)
    digit_mask: tl.constexpr = n_bins - 1

    prefix = tl.zeros((), dtype=tl.uint32)  # the top bits of theta fixed so far
    need = tl.zeros((), dtype=tl.int32)  # rank of theta among the keys matching `prefix`
    for p in tl.static_range(32 // RADIX_BITS):
        # p is a compile-time constant here, so shift is one too (a constexpr annotation would be a
        # reassignment on the next unrolled pass, which the compiler refuses).
        shift = 32 - RADIX_BITS * (p + 1)
        hist = tl.zeros((n_bins,), dtype=tl.int32)
        for s0 in range(0, S, BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            x = tl.load(row + offs, mask=offs < S, other=float("-inf"))
            key = _ordered_key(x, offs < S)
            if p == 0:
                match = key != 0
            else:
                # Keys whose digits above `shift` equal the prefix (key 0 never matches: prefix > 0).
                match = (key >> (shift + RADIX_BITS)) == (prefix >> (shift + RADIX_BITS))
            digit = ((key >> shift) & digit_mask).to(tl.int32)
            hist += tl.histogram(digit, n_bins, mask=match)
        if p == 0:
            need = tl.minimum(tl.sum(hist), K)
        # count_ge[d] = number of matching keys with digit >= d; theta's digit is the largest d with
        # count_ge[d] >= need, and keys with a larger digit are all selected (need drops by their count).
        count_ge = tl.sum(hist) - tl.cumsum(hist, 0) + hist
        d_star = tl.max(tl.where(count_ge >= need, bins, -1))
        above = tl.sum(tl.where(bins > d_star, hist, 0))
        need = need - above
        prefix = prefix | (d_star.to(tl.uint32) << shift)
    # Now theta = prefix exactly and `need` keys equal to theta must still be taken (lowest positions).
    # need == 0 happens only with no selectable key (theta then is all ones and nothing is written).
    theta = prefix
    written = tl.zeros((), dtype=tl.int32)
    eq_taken = tl.zeros((), dtype=tl.int32)
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < S, other=float("-inf"))
        key = _ordered_key(x, offs < S)
        is_eq = (key == theta) & (key != 0)
        eq_rank = eq_taken + tl.cumsum(is_eq.to(tl.int32), 0)
        take = (key > theta) | (is_eq & (eq_rank <= need))
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out_ptr + b * s_ob + t * s_ot + slot, offs.to(tl.int64), mask=take)
        written += tl.sum(take.to(tl.int32))
        eq_taken += tl.sum(is_eq.to(tl.int32))


def topk_indices_triton(scores: torch.Tensor, k: int, block: int = 1024, radix_bits: int = 8) -> torch.Tensor:
    """Triton `topk_indices` (same contract as the reference; slots in position order)."""
    batch, t_len, s_len = scores.shape
    k = min(k, s_len)
    out = torch.full((batch, t_len, k), -1, dtype=torch.int64, device=scores.device)
    if out.numel() == 0:
        return out
    assert 32 % radix_bits == 0, "the digits must tile the 32-bit key"
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    block = min(block, triton.next_power_of_2(s_len))
    _topk_kernel[(t_len, batch)](
        scores, out, t_len, s_len, k,
        scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        BLOCK=block, RADIX_BITS=radix_bits, num_warps=4,
    )
    return out
