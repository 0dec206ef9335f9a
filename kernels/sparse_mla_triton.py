"""Triton sparse MLA attention (shared-latent MQA form), forward with log-sum-exp and backward.

Contract: `kernels.sparse_mla.sparse_mla_attention_reference`. q [B, T, H, Dk], kv [B, S, Dk] with
kv[s] = [c_kv(s) | k_rope(s)] (Dk = 576 = 512 + 64 at full size), value = kv[s, :dv]; indices
[B, T, K] (-1 = unused; entries past the causal limit are ignored like the reference's mask), or
None for dense causal attention. For query t and head h, over the attended set S_t:
    x[h, s] = scale * q[t, h] . kv[s]
    lse[h]  = log sum_{s in S_t} exp(x[h, s])
    o[t, h] = sum_{s in S_t} exp(x[h, s] - lse[h]) kv[s, :dv]
Indices must not repeat within a row (top-k never repeats); a repeat would be counted twice.

Block design (FlashMLA's sparse prefill shape, re-derived): one program per (query t, block of
BLOCK_H heads). All heads of a query share S_t, so each gathered [BLOCK_K, Dk] kv tile is loaded once
and used for BLOCK_H heads as the key (all Dk columns) and as the value (its first dv columns): the
MQA form turns the gather into two MMAs of M = BLOCK_H. Dk is split as [0, dv) and [dv, Dk) so the
value tile is the key tile's first part (no second load) and both parts are powers of two at full
size (512 + 64). The programs of one query are adjacent in the grid (head blocks vary fastest), so
its gathered rows are read from DRAM once and from L2 after. Slots that select nothing real (padding,
future positions) gather row 0 instead of being masked, and get probability 0.
Online softmax in base 2 (exp2 with log2(e) folded into the scale), rescaled lazily: the running max
of a row is only moved (and the [BLOCK_H, dv] accumulator rescaled) when a block raises it by more than
2^8, as FlashAttention-4 does; the result is exact either way, since l, acc and lse share whichever
max was kept, and it saves a [BLOCK_H, 512] multiply on almost every block.
Tile sizes, warps and stages: `_forward_tiles`, `_backward_tiles` (read off bench/kernel_report.py).

Backward, with P = exp(x - lse), dP = dO V^T, Delta[h] = sum_d O[h, d] dO[h, d] (precomputed):
    dS = P * (dP - Delta) * scale
    dq = dS kv                       (accumulated in registers over the selected blocks)
    dkv[s] += dS^T q  (+ P^T dO on the first dv columns)
dkv rows are scattered to arbitrary positions chosen by many queries, so they are accumulated with
fp32 atomics (TileLang's DSA backward does the same); the head sum happens in the MMA first, so each
program issues one atomic per (selected entry, column), not one per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_common import INTERPRET, mma, pow2, target_arch

LOG2E = 1.4426950408889634  # exp(x) = exp2(LOG2E x): the kernels work in base 2
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
#: The forward rescales its running sums only when a row's max grew by more than 2^RESCALE_LOG2.
RESCALE_LOG2: tl.constexpr = tl.constexpr(8.0)


@triton.jit
def _gather_block(
    idx_ptr, s_ib, s_it, b, t, k0, K, S, t_abs,
    BLOCK_K: tl.constexpr, DENSE: tl.constexpr,
):
    """Rows of the k0-th block of S_t (int32) and which of them are real (selected, causal, in range).

    Rows that are not real point at row 0, which always exists: their loads need no mask, and the
    caller zeroes their probabilities. int32 rows keep the gather's address arithmetic narrow (S < 2^31).
    """
    kk = k0 + tl.arange(0, BLOCK_K)
    if DENSE:
        idx = kk
        valid = kk <= t_abs
    else:
        idx = tl.load(idx_ptr + b * s_ib + t * s_it + kk, mask=kk < K, other=-1).to(tl.int32)
        valid = (idx >= 0) & (idx <= t_abs) & (idx < S)
    return tl.where(valid, idx, 0), valid


@triton.jit
def _load_rows(base, rows, cols, n_cols, EVEN: tl.constexpr):
    """tile[i, j] = base[rows[i] + cols[j]]; masked only when the columns do not fill the tile."""
    if EVEN:
        return tl.load(base + rows[:, None] + cols[None, :])
    return tl.load(base + rows[:, None] + cols[None, :], mask=cols[None, :] < n_cols, other=0.0)


@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
    T, S, H, K, DV, DK, offset, scale_log2,
    s_qb, s_qt, s_qh,
    s_kvb, s_kvs,
    s_ib, s_it,
    s_ob, s_ot, s_oh,
    s_lb, s_lt,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    EVEN: tl.constexpr, DENSE: tl.constexpr, WRITE_OUT: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr,
):
    """o and lse for one query and BLOCK_H heads. Column split: A = [0, DV) (value part), B = [DV, DK)."""
    # Head blocks vary fastest in the grid, so the programs of one query run together and share its
    # gathered kv rows through L2.
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    t_abs = t + offset
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = DV + tl.arange(0, BLOCK_B)
    h_ok = offs_h < H
    q_row = q_ptr + b * s_qb + t * s_qt + offs_h[:, None] * s_qh
    q_a = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None] & (offs_a[None, :] < DV), other=0.0)
    q_b = tl.load(q_row + offs_b[None, :], mask=h_ok[:, None] & (offs_b[None, :] < DK), other=0.0)
    kv_base = kv_ptr + b * s_kvb
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_A), tl.float32)
    n_iter = K
    if DENSE:
        n_iter = tl.minimum(S, t_abs + 1)
    for k0 in range(0, n_iter, BLOCK_K):
        idx, valid = _gather_block(idx_ptr, s_ib, s_it, b, t, k0, K, S, t_abs, BLOCK_K, DENSE)
        rows = idx * s_kvs
        kv_a = _load_rows(kv_base, rows, offs_a, DV, EVEN)
        kv_b = _load_rows(kv_base, rows, offs_b, DK, EVEN)
        x = mma(q_a, tl.trans(kv_a), tl.zeros((BLOCK_H, BLOCK_K), tl.float32), INTERP, IEEE)
        x = mma(q_b, tl.trans(kv_b), x, INTERP, IEEE) * scale_log2
        x = tl.where(valid[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        if tl.max((m_new > m_i + RESCALE_LOG2).to(tl.int32)) > 0:
            # Rescale only when some row's running max grew by more than 2^RESCALE_LOG2 (always on the
            # first block with a valid entry). Otherwise the stale max stays: p <= 2^RESCALE_LOG2 is
            # harmless in bf16/fp32, and the final lse and normalisation use the same max as l and acc.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha
            if WRITE_OUT:
                acc = acc * alpha[:, None]
            m_i = m_new
        # A row with nothing valid yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        p = tl.exp2(x - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
        l_i = l_i + tl.sum(p, axis=1)
        if WRITE_OUT:
            acc = mma(p.to(kv_a.dtype), kv_a, acc, INTERP, IEEE)
    lse = tl.where(l_i > 0.0, (m_i + tl.log2(l_i)) * _LN2, float("-inf"))
    tl.store(lse_ptr + b * s_lb + t * s_lt + offs_h, lse, mask=h_ok)
    if WRITE_OUT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + b * s_ob + t * s_ot + offs_h[:, None] * s_oh + offs_a[None, :]
        tl.store(o_ptrs, out, mask=h_ok[:, None] & (offs_a[None, :] < DV))


@triton.jit
def _sparse_mla_bwd_kernel(
    q_ptr, kv_ptr, idx_ptr, lse_ptr, do_ptr, delta_ptr, dq_ptr, dkv_ptr,
    T, S, H, K, DV, DK, offset, scale,
    s_qb, s_qt, s_qh,
    s_kvb, s_kvs,
    s_ib, s_it,
    s_ob, s_ot, s_oh,
    s_lb, s_lt,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    EVEN: tl.constexpr, DENSE: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr,
):
    """dq for one query and BLOCK_H heads (stored) and its share of dkv (fp32 atomics)."""
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # head blocks fastest: see the forward
    t = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    t_abs = t + offset
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = DV + tl.arange(0, BLOCK_B)
    h_ok = offs_h < H
    mask_a = h_ok[:, None] & (offs_a[None, :] < DV)
    mask_b = h_ok[:, None] & (offs_b[None, :] < DK)
    q_off = b * s_qb + t * s_qt + offs_h[:, None] * s_qh
    q_a = tl.load(q_ptr + q_off + offs_a[None, :], mask=mask_a, other=0.0)
    q_b = tl.load(q_ptr + q_off + offs_b[None, :], mask=mask_b, other=0.0)
    do_ptrs = do_ptr + b * s_ob + t * s_ot + offs_h[:, None] * s_oh + offs_a[None, :]
    do = tl.load(do_ptrs, mask=mask_a, other=0.0)
    lse = tl.load(lse_ptr + b * s_lb + t * s_lt + offs_h, mask=h_ok, other=0.0)
    # P = exp(scale x - lse) = exp2(scale log2(e) x - log2(e) lse); empty rows (lse = -inf) have every P
    # masked to 0 below, so any finite stand-in does.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E)
    scale_log2 = scale * _LOG2E
    delta = tl.load(delta_ptr + b * s_lb + t * s_lt + offs_h, mask=h_ok, other=0.0)
    kv_base = kv_ptr + b * s_kvb
    dkv_base = dkv_ptr + b * s_kvb
    dq_a = tl.zeros((BLOCK_H, BLOCK_A), tl.float32)
    dq_b = tl.zeros((BLOCK_H, BLOCK_B), tl.float32)
    n_iter = K
    if DENSE:
        n_iter = tl.minimum(S, t_abs + 1)
    for k0 in range(0, n_iter, BLOCK_K):
        idx, valid = _gather_block(idx_ptr, s_ib, s_it, b, t, k0, K, S, t_abs, BLOCK_K, DENSE)
        rows = idx * s_kvs
        kv_a = _load_rows(kv_base, rows, offs_a, DV, EVEN)
        kv_b = _load_rows(kv_base, rows, offs_b, DK, EVEN)
        x = mma(q_a, tl.trans(kv_a), tl.zeros((BLOCK_H, BLOCK_K), tl.float32), INTERP, IEEE)
        x = mma(q_b, tl.trans(kv_b), x, INTERP, IEEE)
        p = tl.where(valid[None, :], tl.exp2(x * scale_log2 - lse2[:, None]), 0.0)
        dp = mma(do, tl.trans(kv_a), tl.zeros((BLOCK_H, BLOCK_K), tl.float32), INTERP, IEEE)
        ds = (p * (dp - delta[:, None]) * scale).to(kv_a.dtype)
        dq_a = mma(ds, kv_a, dq_a, INTERP, IEEE)
        dq_b = mma(ds, kv_b, dq_b, INTERP, IEEE)
        dkv_a = mma(tl.trans(ds), q_a, tl.zeros((BLOCK_K, BLOCK_A), tl.float32), INTERP, IEEE)
        dkv_a = mma(tl.trans(p.to(do.dtype)), do, dkv_a, INTERP, IEEE)
        dkv_b = mma(tl.trans(ds), q_b, tl.zeros((BLOCK_K, BLOCK_B), tl.float32), INTERP, IEEE)
        # Rows that are not real (row 0 stands in) carry zero gradient and are not written.
        dkv_rows = dkv_base + rows[:, None]
        tl.atomic_add(dkv_rows + offs_a[None, :], dkv_a, mask=valid[:, None] & (offs_a[None, :] < DV))
        tl.atomic_add(dkv_rows + offs_b[None, :], dkv_b, mask=valid[:, None] & (offs_b[None, :] < DK))
    tl.store(dq_ptr + q_off + offs_a[None, :], dq_a, mask=mask_a)
    tl.store(dq_ptr + q_off + offs_b[None, :], dq_b, mask=mask_b)


# Tile choices. At the full MLA width (512-wide values) each was read off the compile report
# (bench/kernel_report.py: registers, spills, shared memory, MMA instruction at DeepSeek-V3.2's shapes);
# the figures quoted are that report's, Triton 3.9. Narrower widths (tests, the tiny preset) keep small tiles.


def _forward_tiles(n_heads: int, block_a: int, arch: int, write_out: bool) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_K, num_warps, num_stages) of the forward.

    Full width, with the output (write_out):
    - BLOCK_H 64: the warp-group MMA's M is 64; 128 heads make two programs per query, adjacent in the
      grid so the second finds the gathered rows in L2.
    - 8 warps: the [64, 512] fp32 output accumulator is 128 registers a thread over 256 threads; 4 warps
      would need 256, and 16 warps cap a thread at 128 registers (report: 450-1,200 B of spills).
    - BLOCK_K 16 on Hopper: at 32 the kernel needs 255 registers and spills inside its loop (9-14
      local loads per block); at 16 nothing spills in the loop (60-70 B around it). Blackwell keeps the
      accumulator in tensor memory (tcgen05): 32 entries fit there without spills.
    - 3 stages: the next blocks' gathers are in flight while one is computed; at 255 registers only one
      program fits on an SM, so nothing else hides the gather latency. Shared memory: 108 KB (sm_90).
    Known cost: Triton gives a dot whose result feeds another dot all warps along M, so at M = 64 both
    warp groups compute the same [64, BLOCK_K] scores, the 576-wide q.kv product (53% of the useful
    FLOPs) runs twice, and at most 65% of the tensor-core work is useful; on Hopper it runs as wgmma
    m64n8k16, whose N = 8 makes it shared-memory-bound.
    lse only (the indexer loss): no output accumulator and no second dot, so the warps split the
    scores instead of repeating them and 32 entries a block fit (128 registers, no spills).
    """
    if block_a < 256:
        return min(64, pow2(n_heads)), 64, 4, 2
    if not write_out:
        return 64, 32, 8, 2
    return 64, 32 if 100 <= arch < 110 else 16, 8, 3  # 10.x: datacenter Blackwell (B200, B300)


def _backward_tiles(n_heads: int, block_a: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_K, num_warps, num_stages) of the backward.

    The one-pass backward keeps dq [BLOCK_H, 576] (fp32) in registers for the whole walk and builds a
    [BLOCK_K, 576] dkv tile per block. At 64 heads that does not fit at any tile size (report: 1-8 KB of
    spills at BLOCK_K 16-64, 4 or 8 warps); at 32 heads, 16 entries and 8 warps it does (no spill in the
    loop; 32/16 B around it on Hopper, none on Blackwell), with 2 stages of prefetched gathers (118 KB).
    Known cost: with M = 32 the dots run on mma.sync, not the warp-group MMA; one MMA layout with the 8
    warps side by side along N serves every dot, so the [32, 16] score tiles (q.kv and dO.v, 40% of the
    useful FLOPs) are computed 4 times over; four programs per query each gather the selected rows and
    add their own dkv share with fp32 atomics. The next step is two kernels (dq, and dkv with its columns
    in chunks) so that each can use 64-row warp-group MMAs.
    """
    if block_a < 256:
        return min(64, pow2(n_heads)), 64, 4, 2
    return 32, 16, 8, 2


def _prepare_indices(indices: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    if indices is None:
        # Dense causal attention: positions 0..t are generated in-kernel; a dummy pointer is passed.
        return q.new_zeros(1, 1, 1, dtype=torch.int64), 0, True
    idx = indices if indices.stride(-1) == 1 else indices.contiguous()
    return idx, idx.shape[-1], False


def _launch_forward(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor | None,
    scale: float,
    dv: int,
    write_out: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, t_len, n_heads, dk = q.shape
    s_len = kv.shape[1]
    assert kv.shape == (batch, s_len, dk) and 0 < dv <= dk and t_len <= s_len, "shape mismatch"
    q, kv = q.contiguous(), kv.contiguous()
    idx, k_len, dense = _prepare_indices(indices, q)
    out = torch.empty(batch, t_len, n_heads, dv, dtype=q.dtype, device=q.device) if write_out else q
    lse = torch.empty(batch, t_len, n_heads, dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    block_a, block_b = pow2(dv), pow2(dk - dv)
    block_h, block_k, num_warps, num_stages = _forward_tiles(n_heads, block_a, target_arch(q.device), write_out)
    grid = (triton.cdiv(n_heads, block_h), t_len, batch)
    _sparse_mla_fwd_kernel[grid](
        q, kv, idx, out, lse,
        t_len, s_len, n_heads, k_len, dv, dk, s_len - t_len, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1),
        idx.stride(0), idx.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_A=block_a, BLOCK_B=block_b,
        EVEN=block_a == dv and block_b == dk - dv,
        DENSE=dense, WRITE_OUT=write_out, INTERP=INTERPRET, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def attention_lse(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """lse [B, T, H] of scale * q . kv over the attended set, without computing the output.

    The column split only serves the value part, so any split works: take the largest power of two.
    """
    dk = q.shape[-1]
    split = 1 << (dk.bit_length() - 1)
    return _launch_forward(q, kv, indices, scale, split, write_out=False)[1]


def _launch_backward(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor | None, scale: float, dv: int,
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, t_len, n_heads, dk = q.shape
    s_len = kv.shape[1]
    dout = dout.contiguous().to(q.dtype)
    delta = (out.float() * dout.float()).sum(-1).contiguous()  # Delta[t, h] = O . dO
    idx, k_len, dense = _prepare_indices(indices, q)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return dq.to(q.dtype), dkv.to(kv.dtype)
    block_a, block_b = pow2(dv), pow2(dk - dv)
    block_h, block_k, num_warps, num_stages = _backward_tiles(n_heads, block_a)
    grid = (triton.cdiv(n_heads, block_h), t_len, batch)
    _sparse_mla_bwd_kernel[grid](
        q, kv, idx, lse, dout, delta, dq, dkv,
        t_len, s_len, n_heads, k_len, dv, dk, s_len - t_len, scale,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1),
        idx.stride(0), idx.stride(1),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1),
        BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_A=block_a, BLOCK_B=block_b,
        EVEN=block_a == dv and block_b == dk - dv,
        DENSE=dense, INTERP=INTERPRET, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq.to(q.dtype), dkv.to(kv.dtype)


class SparseMLAFn(torch.autograd.Function):
    """Autograd wrapper: saves (q, kv, indices, out, lse); the gradient flows to q and kv."""

    @staticmethod
    def forward(ctx, q, kv, indices, scale: float, dv: int):  # type: ignore[override]
        q, kv = q.contiguous(), kv.contiguous()
        out, lse = _launch_forward(q, kv, indices, scale, dv)
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.scale, ctx.dv = scale, dv
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, kv, indices, out, lse = ctx.saved_tensors
        if dout is None:
            return None, None, None, None, None
        dq, dkv = _launch_backward(q, kv, indices, ctx.scale, ctx.dv, out, lse, dout)
        return dq, dkv, None, None, None


def sparse_mla_attention_triton(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor | None, scale: float, dv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `sparse_mla_attention` (same contract as the reference); differentiable in q and kv.

    lse is returned without gradient (the kernels use it as saved state; a loss on it is not supported).
    """
    return SparseMLAFn.apply(q, kv, indices, float(scale), int(dv))

