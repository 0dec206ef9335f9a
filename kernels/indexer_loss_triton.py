"""Triton indexer KL loss (dense warm-up and sparse stage) without materialising [heads, L, L].

Contract: `kernels.indexer_loss.indexer_kl_loss_reference`. For query t over its attended set S_t
(all causal positions for the dense warm-up, the top-k selection for the sparse stage):
    P[h, s] = exp(scale * q[t, h] . kv[s] - lse[t, h])       main attention of head h (lse over S_t)
    p[s]    = (1/H) sum_h P[h, s],   target = p / Z,  Z = sum_s p[s]  (Z = 1 up to rounding)
    KL_t    = sum_s target (log target - log_softmax(I_t)[s])
            = A / Z - log Z - C / Z + lseI,   A = sum p log p,  C = sum p I,  lseI = logsumexp_{S_t} I
so one pass over S_t with running sums gives KL_t. The loss is the (masked) mean over queries.
Gradient (only the indexer scores train): dKL_t / dI[t, s] = softmax_{S_t}(I_t)[s] - target[s] on
S_t, 0 elsewhere.

Block design. (1) lse[t, h]: the sparse-MLA forward kernel without its value product
(`attention_lse`; the attention forward's own lse is identical and could be passed instead).
(2) One program per query walks S_t in blocks of BLOCK_K gathered kv rows; for each block it takes
the heads (the M side of the MMA) as one [H, Dk] query tile, loaded once per query (all 128 heads at
full size; more heads than one tile holds are walked in tiles per block) and reduces P over heads in
registers, so only the head-summed p[s] exists, never [H, S]. It writes p (one fp32 per attended entry:
[B, T, K] sparse, [B, T, S] dense, the size of I itself) and three per-query scalars (Z, lseI, KL)
for the backward. (3) The backward is elementwise per attended entry and scatters dI into a dense
[B, T, S] gradient (zeros elsewhere), since I is dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._triton_common import INTERPRET, mma, pow2
from kernels.sparse_mla_triton import _gather_block, _load_rows, attention_lse


@triton.jit
def _head_tile(q_ptr, lse_ptr, b, t, h0, s_qb, s_qt, s_qh, s_lb, s_lt, H, DA, DK, BLOCK_H: tl.constexpr,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """The query tile [BLOCK_H, Dk] (as its A and B column parts) and lse of heads h0.. of query t."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = DA + tl.arange(0, BLOCK_B)
    h_ok = offs_h < H
    q_row = q_ptr + b * s_qb + t * s_qt + offs_h[:, None] * s_qh
    q_a = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None] & (offs_a[None, :] < DA), other=0.0)
    q_b = tl.load(q_row + offs_b[None, :], mask=h_ok[:, None] & (offs_b[None, :] < DK), other=0.0)
    # Padding heads get lse = +inf: their P = exp(x - inf) is 0.
    lse = tl.load(lse_ptr + b * s_lb + t * s_lt + offs_h, mask=h_ok, other=float("inf"))
    return q_a, q_b, lse


@triton.jit
def _head_sum(q_a, q_b, lse, kv_a, kv_b, valid, scale, BLOCK_K: tl.constexpr, INTERP: tl.constexpr,
              IEEE: tl.constexpr):
    """sum over the tile's heads of P[h, s] = exp(scale q_h . kv_s - lse_h), for the BLOCK_K entries."""
    x = mma(q_a, tl.trans(kv_a), tl.zeros((q_a.shape[0], BLOCK_K), tl.float32), INTERP, IEEE)
    x = mma(q_b, tl.trans(kv_b), x, INTERP, IEEE) * scale
    probs = tl.where(valid[None, :], tl.exp(x - lse[:, None]), 0.0)
    return tl.sum(probs, axis=0)


@triton.jit
def _indexer_kl_fwd_kernel(
    q_ptr, kv_ptr, lse_ptr, score_ptr, idx_ptr, p_ptr, stats_ptr,
    T, S, H, K, DA, DK, offset, scale, inv_h,
    s_qb, s_qt, s_qh,
    s_kvb, s_kvs,
    s_lb, s_lt,
    s_sb, s_st,
    s_ib, s_it,
    s_pb, s_pt,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    ONE_TILE: tl.constexpr, EVEN: tl.constexpr, DENSE: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr,
):
    """KL_t for one query; stores p (head-averaged attention) per attended slot and (Z, lseI, KL)."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    t_abs = t + offset
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = DA + tl.arange(0, BLOCK_B)
    kv_base = kv_ptr + b * s_kvb
    z = tl.zeros((), tl.float32)
    a_sum = tl.zeros((), tl.float32)
    c_sum = tl.zeros((), tl.float32)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    # All heads in one tile (ONE_TILE, full size: 128): the query tile is loaded once, outside the walk.
    if ONE_TILE:
        q_a, q_b, lse = _head_tile(q_ptr, lse_ptr, b, t, 0, s_qb, s_qt, s_qh, s_lb, s_lt, H, DA, DK,
                                    BLOCK_H, BLOCK_A, BLOCK_B)
    n_iter = K
    if DENSE:
        n_iter = tl.minimum(S, t_abs + 1)
    for k0 in range(0, n_iter, BLOCK_K):
        idx, valid = _gather_block(idx_ptr, s_ib, s_it, b, t, k0, K, S, t_abs, BLOCK_K, DENSE)
        rows = idx * s_kvs
        kv_a = _load_rows(kv_base, rows, offs_a, DA, EVEN)
        kv_b = _load_rows(kv_base, rows, offs_b, DK, EVEN)
        if ONE_TILE:
            p = _head_sum(q_a, q_b, lse, kv_a, kv_b, valid, scale, BLOCK_K, INTERP, IEEE)
        else:
            p = tl.zeros((BLOCK_K,), tl.float32)
            for h0 in range(0, H, BLOCK_H):
                qh_a, qh_b, lse_h = _head_tile(q_ptr, lse_ptr, b, t, h0, s_qb, s_qt, s_qh, s_lb, s_lt, H, DA,
                                                DK, BLOCK_H, BLOCK_A, BLOCK_B)
                p += _head_sum(qh_a, qh_b, lse_h, kv_a, kv_b, valid, scale, BLOCK_K, INTERP, IEEE)
        p = p * inv_h
        kk = k0 + tl.arange(0, BLOCK_K)
        tl.store(p_ptr + b * s_pb + t * s_pt + kk, p, mask=kk < n_iter)
        score = tl.load(score_ptr + b * s_sb + t * s_st + idx, mask=valid, other=float("-inf"))
        pos = p > 0.0
        z += tl.sum(p)
        a_sum += tl.sum(tl.where(pos, p * tl.log(tl.where(pos, p, 1.0)), 0.0))
        # Masked lanes hold score = -inf and p = 0: zero the score first (0 * -inf would be NaN).
        c_sum += tl.sum(tl.where(pos, p * tl.where(valid, score, 0.0), 0.0))
        m_new = tl.maximum(m_i, tl.max(score))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(score - m_safe))
        m_i = m_new
    lse_i = m_i + tl.log(l_i)
    kl = a_sum / z - tl.log(z) - c_sum / z + lse_i
    stats = stats_ptr + (b * T + t) * 3
    tl.store(stats, z)
    tl.store(stats + 1, lse_i)
    tl.store(stats + 2, kl)


@triton.jit
def _indexer_kl_bwd_kernel(
    score_ptr, idx_ptr, p_ptr, stats_ptr, dkl_ptr, dscore_ptr,
    T, S, K, offset,
    s_sb, s_st,
    s_ib, s_it,
    s_pb, s_pt,
    BLOCK_K: tl.constexpr, DENSE: tl.constexpr,
):
    """dI[t, s] = dKL_t * (softmax_{S_t}(I_t)[s] - p[s] / Z) on S_t (scattered into a zeroed dense dI)."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    t_abs = t + offset
    stats = stats_ptr + (b * T + t) * 3
    z = tl.load(stats)
    lse_i = tl.load(stats + 1)
    g = tl.load(dkl_ptr + b * T + t)
    n_iter = K
    if DENSE:
        n_iter = tl.minimum(S, t_abs + 1)
    for k0 in range(0, n_iter, BLOCK_K):
        idx, valid = _gather_block(idx_ptr, s_ib, s_it, b, t, k0, K, S, t_abs, BLOCK_K, DENSE)
        kk = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(p_ptr + b * s_pb + t * s_pt + kk, mask=valid, other=0.0)
        score = tl.load(score_ptr + b * s_sb + t * s_st + idx, mask=valid, other=float("-inf"))
        grad = g * (tl.exp(score - lse_i) - p / z)
        tl.store(dscore_ptr + b * s_sb + t * s_st + idx, grad, mask=valid)


def _kl_tiles(n_heads: int, block_a: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_K, num_warps, num_stages) of the KL forward.

    Full size: all 128 heads in one tile (loaded once per query, held in shared memory: 147 KB), 32 selected
    entries a block, 2 stages of prefetched gathers: 217 KB of the 227 KB a program may use, 91 registers,
    no spills (compile report, bench/kernel_report.py). The earlier 64-head tiles reloaded q for every
    block of entries and, pipelined, needed 248 KB, which no Hopper or Blackwell GPU gives a program.
    """
    if block_a < 256:
        return min(64, pow2(n_heads)), 64, 4, 2
    return min(128, pow2(n_heads)), 32, 8, 2


@dataclass
class KLState:
    """What the KL backward needs: the scores, the attended slots, p per slot and (Z, lseI, KL) per query."""

    scores: torch.Tensor  # [B, T, S] fp32
    idx: torch.Tensor  # [B, T, K] selection, or a dummy when dense
    p: torch.Tensor  # [B, T, K or S] head-averaged attention per attended slot
    stats: torch.Tensor  # [B, T, 3]
    dense: bool
    k_len: int


def launch_kl_forward(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float,
    index_scores: torch.Tensor,
    indices: torch.Tensor | None,
    lse: torch.Tensor | None,
) -> KLState:
    """KL_t per query (in `stats[..., 2]`) and the state for the backward; q and kv are treated as constants."""
    batch, t_len, n_heads, dk = q.shape
    s_len = kv.shape[1]
    q, kv = q.detach().contiguous(), kv.detach().contiguous()
    scores = index_scores.detach().float().contiguous()
    if lse is None:
        lse = attention_lse(q, kv, indices, scale)
    lse = lse.float().contiguous()
    dense = indices is None
    idx = q.new_zeros(1, 1, 1, dtype=torch.int64) if dense else indices.contiguous()
    k_len = 0 if dense else idx.shape[-1]
    width = s_len if dense else k_len
    p = torch.zeros(batch, t_len, max(width, 1), dtype=torch.float32, device=q.device)
    stats = torch.zeros(batch, t_len, 3, dtype=torch.float32, device=q.device)
    split = 1 << (dk.bit_length() - 1)  # the column split is arbitrary here (no value part)
    block_h, block_k, num_warps, num_stages = _kl_tiles(n_heads, pow2(split))
    block_a, block_b = pow2(split), pow2(dk - split)
    if t_len > 0:
        _indexer_kl_fwd_kernel[(t_len, batch)](
            q, kv, lse, scores, idx, p, stats,
            t_len, s_len, n_heads, k_len, split, dk, s_len - t_len, float(scale), 1.0 / n_heads,
            q.stride(0), q.stride(1), q.stride(2),
            kv.stride(0), kv.stride(1),
            lse.stride(0), lse.stride(1),
            scores.stride(0), scores.stride(1),
            idx.stride(0), idx.stride(1),
            p.stride(0), p.stride(1),
            BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_A=block_a, BLOCK_B=block_b,
            ONE_TILE=block_h >= n_heads, EVEN=block_a == split and block_b == dk - split,
            DENSE=dense, INTERP=INTERPRET, IEEE=q.dtype == torch.float32,
            num_warps=num_warps, num_stages=num_stages,
        )
    return KLState(scores, idx, p, stats, dense, k_len)


def launch_kl_backward(state: KLState, dkl: torch.Tensor) -> torch.Tensor:
    """dKL/dI [B, T, S] (fp32): dKL_t * (softmax_{S_t}(I_t) - target) on S_t, zero elsewhere."""
    batch, t_len, s_len = state.scores.shape
    dscores = torch.zeros_like(state.scores)
    if t_len > 0:
        _indexer_kl_bwd_kernel[(t_len, batch)](
            state.scores, state.idx, state.p, state.stats, dkl.float().contiguous(), dscores,
            t_len, s_len, state.k_len, s_len - t_len,
            state.scores.stride(0), state.scores.stride(1),
            state.idx.stride(0), state.idx.stride(1),
            state.p.stride(0), state.p.stride(1),
            BLOCK_K=1024, DENSE=state.dense,
        )
    return dscores


class IndexerKLFn(torch.autograd.Function):
    """Per-query KL_t [B, T]; gradient to index_scores only (q and kv are the detached target's inputs)."""

    @staticmethod
    def forward(ctx, index_scores, q, kv, scale: float, indices, lse):  # type: ignore[override]
        ctx.state = launch_kl_forward(q, kv, scale, index_scores, indices, lse)
        ctx.score_dtype = index_scores.dtype
        return ctx.state.stats[..., 2].clone()

    @staticmethod
    def backward(ctx, dkl):  # type: ignore[override]
        dscores = launch_kl_backward(ctx.state, dkl)
        return dscores.to(ctx.score_dtype), None, None, None, None, None


def indexer_kl_per_query_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float,
    index_scores: torch.Tensor,
    indices: torch.Tensor | None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL_t [B, T] (fp32), differentiable in index_scores. `lse` [B, T, H]: the main attention's
    log-sum-exp over the same attended set, if the caller has it (else recomputed)."""
    return IndexerKLFn.apply(index_scores, q, kv, float(scale), indices, lse)


def indexer_kl_loss_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float,
    index_scores: torch.Tensor,
    indices: torch.Tensor | None,
    query_mask: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `indexer_kl_loss` (same contract as the reference): mean of KL_t over unmasked queries."""
    kl = indexer_kl_per_query_triton(q, kv, scale, index_scores, indices, lse)
    if query_mask is None:
        return kl.mean()
    query_mask = query_mask.to(kl.dtype)
    return (kl * query_mask).sum() / query_mask.sum().clamp(min=1)
