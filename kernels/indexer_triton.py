"""Triton lightning indexer: I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]), causal; bf16/fp32 and FP8.

Contract: `kernels.indexer.indexer_scores_reference` (q [B, T, H, D], k [B, S, D], w [B, T, H] with the
scales folded in; fp32 scores [B, T, S], -inf where s > t + (S - T)).

Block design (forward). One program owns a [BLOCK_T, BLOCK_S] tile of I for one batch row. The
(query, head) pairs of its BLOCK_T queries are walked BLOCK_H heads at a time as the M side of one
MMA: rows r = (t, j) of q flattened to [BLOCK_T * BLOCK_H, D] times the key tile [D, BLOCK_S]. That
is the shape trick DeepGEMM's indexer uses (heads in the MMA, ReLU, weight and head sum in
registers): the per-head logits never leave registers, only the head-summed [BLOCK_T, BLOCK_S] tile
is written. For decode (T = 1) BLOCK_T is 1 and the M side is the heads alone. Tiles wholly above
the causal diagonal are filled with -inf without touching q or k.

FP8 (DeepSeek's serving path): q and k are Hadamard-rotated (an orthogonal map, so q . k is
unchanged and only the rounding moves), then cast to e4m3 with power-of-two scales: one per token
for k, one per (token, head) for q. Because ReLU(c x) = c ReLU(x) for c > 0, the q scale folds into
the head weight w[t, j], and the k scale multiplies the head sum once per (t, s), after the sum.

Backward (the KL loss's gradient reaches the indexer through I): with g = dL/dI,
  dq[t, j] = sum_s g[t, s] w[t, j] 1[q[t, j] . k[s] > 0] k[s]
  dw[t, j] = sum_s g[t, s] ReLU(q[t, j] . k[s])
  dk[s]    = sum_{t, j} g[t, s] w[t, j] 1[q[t, j] . k[s] > 0] q[t, j]
Two kernels, both recomputing the logits tile: one per query block (dq, dw; walks keys) and one per
key block (dk; walks queries), so no atomics and deterministic results.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._triton_common import INTERPRET, mma, pow2

FP8_E4M3_MAX = 448.0


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _load_q_rows(q_ptr, b, s_qb, s_qt, s_qh, row_t, row_h, row_ok, offs_d, D):
    """q rows [(t, j) pairs, D]: row r holds q[b, row_t[r], row_h[r], :] (0 where masked)."""
    ptrs = q_ptr + b * s_qb + row_t.to(tl.int64)[:, None] * s_qt + row_h[:, None] * s_qh + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_grad_rows(g_ptr, b, s_gb, s_gt, offs_t, offs_s, T, S, offset, BLOCK_H: tl.constexpr):
    """dL/dI tile [BLOCK_T, BLOCK_S] (0 above the diagonal, where I is the constant -inf), repeated per
    head to the [(t, j) rows, BLOCK_S] layout of the logits."""
    visible = (offs_s[None, :] <= offs_t[:, None] + offset) & (offs_t[:, None] < T) & (offs_s[None, :] < S)
    g_ptrs = g_ptr + b * s_gb + offs_t.to(tl.int64)[:, None] * s_gt + offs_s[None, :]
    g = tl.load(g_ptrs, mask=visible, other=0.0)
    block_t: tl.constexpr = g.shape[0]
    block_s: tl.constexpr = g.shape[1]
    g3 = tl.broadcast_to(g[:, None, :], (block_t, BLOCK_H, block_s))
    return tl.reshape(g3, (block_t * BLOCK_H, block_s))


@triton.jit
def _indexer_fwd_kernel(
    q_ptr, k_ptr, w_ptr, kscale_ptr, out_ptr,
    T, S, H, D, offset,
    s_qb, s_qt, s_qh,
    s_kb, s_ks,
    s_wb, s_wt,
    s_ksb,
    s_ob, s_ot,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KSCALE: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr,
):
    """One [BLOCK_T, BLOCK_S] tile of I = sum_j w ReLU(q_j . k), -inf above the diagonal (t + offset < s)."""
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = pid_t * BLOCK_T
    s0 = pid_s * BLOCK_S
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    out_ptrs = out_ptr + b * s_ob + offs_t.to(tl.int64)[:, None] * s_ot + offs_s[None, :]
    out_mask = (offs_t[:, None] < T) & (offs_s[None, :] < S)
    last_t = tl.minimum(t0 + BLOCK_T, T) - 1
    if s0 > last_t + offset:
        # The whole tile is in the future of every query in it: only the mask value is stored.
        tl.store(out_ptrs, tl.full((BLOCK_T, BLOCK_S), float("-inf"), tl.float32), mask=out_mask)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(
            k_ptr + b * s_kb + offs_s.to(tl.int64)[:, None] * s_ks + offs_d[None, :],
            mask=(offs_s[:, None] < S) & (offs_d[None, :] < D), other=0.0,
        )
        # Row r of the MMA's M side is the pair (query t0 + r // BLOCK_H, head h0 + r % BLOCK_H).
        rows = tl.arange(0, BLOCK_T * BLOCK_H)
        row_t = t0 + rows // BLOCK_H
        acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            row_h = h0 + rows % BLOCK_H
            row_ok = (row_t < T) & (row_h < H)
            q = _load_q_rows(q_ptr, b, s_qb, s_qt, s_qh, row_t, row_h, row_ok, offs_d, D)
            w = tl.load(w_ptr + b * s_wb + row_t.to(tl.int64) * s_wt + row_h, mask=row_ok, other=0.0)
            logits = mma(q, tl.trans(k), tl.zeros((BLOCK_T * BLOCK_H, BLOCK_S), tl.float32), INTERP, IEEE)
            weighted = tl.maximum(logits, 0.0) * w.to(tl.float32)[:, None]
            acc += tl.sum(tl.reshape(weighted, (BLOCK_T, BLOCK_H, BLOCK_S)), axis=1)
        if HAS_KSCALE:
            # FP8: the per-key dequantisation scale is common to all heads, so it is applied after the sum.
            ks = tl.load(kscale_ptr + b * s_ksb + offs_s, mask=offs_s < S, other=0.0)
            acc = acc * ks[None, :]
        visible = offs_s[None, :] <= offs_t[:, None] + offset
        tl.store(out_ptrs, tl.where(visible, acc, float("-inf")), mask=out_mask)


@triton.jit
def _indexer_bwd_dq_dw_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, dq_ptr, dw_ptr,
    T, S, H, D, offset,
    s_qb, s_qt, s_qh,
    s_kb, s_ks,
    s_wb, s_wt,
    s_gb, s_gt,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERP: tl.constexpr, IEEE: tl.constexpr,
):
    """dq and dw for BLOCK_T queries x BLOCK_H heads, walking the causal keys. dq/dw are fp32, q's layout."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t0 = pid_t * BLOCK_T
    rows = tl.arange(0, BLOCK_T * BLOCK_H)
    row_t = t0 + rows // BLOCK_H
    row_h = pid_h * BLOCK_H + rows % BLOCK_H
    row_ok = (row_t < T) & (row_h < H)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q_rows(q_ptr, b, s_qb, s_qt, s_qh, row_t, row_h, row_ok, offs_d, D)
    dq_ptrs = dq_ptr + b * s_qb + row_t.to(tl.int64)[:, None] * s_qt + row_h[:, None] * s_qh + offs_d[None, :]
    w = tl.load(w_ptr + b * s_wb + row_t.to(tl.int64) * s_wt + row_h, mask=row_ok, other=0.0).to(tl.float32)
    offs_tt = t0 + tl.arange(0, BLOCK_T)
    dq = tl.zeros((BLOCK_T * BLOCK_H, BLOCK_D), dtype=tl.float32)
    dw = tl.zeros((BLOCK_T * BLOCK_H,), dtype=tl.float32)
    # Keys past the last query's causal limit get no gradient (I is -inf there): stop the walk early.
    s_end = tl.minimum(S, tl.minimum(t0 + BLOCK_T, T) + offset)
    for s0 in range(0, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        k = tl.load(
            k_ptr + b * s_kb + offs_s.to(tl.int64)[:, None] * s_ks + offs_d[None, :],
            mask=(offs_s[:, None] < S) & (offs_d[None, :] < D), other=0.0,
        )
        g_rows = _load_grad_rows(g_ptr, b, s_gb, s_gt, offs_tt, offs_s, T, S, offset, BLOCK_H)
        logits = mma(q, tl.trans(k), tl.zeros((BLOCK_T * BLOCK_H, BLOCK_S), tl.float32), INTERP, IEEE)
        dw += tl.sum(g_rows * tl.maximum(logits, 0.0), axis=1)
        dlogits = tl.where(logits > 0.0, g_rows * w[:, None], 0.0)
        dq = mma(dlogits.to(k.dtype), k, dq, INTERP, IEEE)
    tl.store(dq_ptrs, dq, mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(dw_ptr + b * s_wb + row_t.to(tl.int64) * s_wt + row_h, dw, mask=row_ok)


@triton.jit
def _indexer_bwd_dk_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, dk_ptr,
    T, S, H, D, offset,
    s_qb, s_qt, s_qh,
    s_kb, s_ks,
    s_wb, s_wt,
    s_gb, s_gt,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERP: tl.constexpr, IEEE: tl.constexpr,
):
    """dk for BLOCK_S keys, walking the queries that can see them (t + offset >= s) and all heads."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s0 = pid_s * BLOCK_S
    offs_s = s0 + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    k_off = b * s_kb + offs_s.to(tl.int64)[:, None] * s_ks + offs_d[None, :]
    k_mask = (offs_s[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(k_ptr + k_off, mask=k_mask, other=0.0)
    rows = tl.arange(0, BLOCK_T * BLOCK_H)
    dk = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    t_start = tl.maximum(s0 - offset, 0)
    t_start = (t_start // BLOCK_T) * BLOCK_T
    for t0 in range(t_start, T, BLOCK_T):
        offs_tt = t0 + tl.arange(0, BLOCK_T)
        g_rows = _load_grad_rows(g_ptr, b, s_gb, s_gt, offs_tt, offs_s, T, S, offset, BLOCK_H)
        row_t = t0 + rows // BLOCK_H
        for h0 in range(0, H, BLOCK_H):
            row_h = h0 + rows % BLOCK_H
            row_ok = (row_t < T) & (row_h < H)
            q = _load_q_rows(q_ptr, b, s_qb, s_qt, s_qh, row_t, row_h, row_ok, offs_d, D)
            w = tl.load(w_ptr + b * s_wb + row_t.to(tl.int64) * s_wt + row_h, mask=row_ok, other=0.0)
            logits = mma(q, tl.trans(k), tl.zeros((BLOCK_T * BLOCK_H, BLOCK_S), tl.float32), INTERP, IEEE)
            dlogits = tl.where(logits > 0.0, g_rows * w.to(tl.float32)[:, None], 0.0)
            dk = mma(tl.trans(dlogits.to(q.dtype)), q, dk, INTERP, IEEE)
    tl.store(dk_ptr + k_off, dk, mask=k_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


#: The forward: 4 warps and 3 stages of key tiles compile to 252 registers without spills, 112 KB of shared
#: memory (bf16), at full size; the logits tile is reduced over heads, never fed to a second dot.
FORWARD_LAUNCH = dict(num_warps=4, num_stages=3)
#: The backward kernels hold the logits, the repeated gradient rows and an fp32 dq (or dk) tile at once:
#: with 4 warps both spill inside their loops (compile report: 6 and 72 local loads per block); 8 warps
#: halve each thread's share (164-214 registers, no spills; 88 and 129 KB of shared memory).
BACKWARD_LAUNCH = dict(num_warps=8, num_stages=3)


def _blocks(t_len: int, n_heads: int, dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_S, BLOCK_D): about 128 (query, head) rows per MMA, 64 keys per tile.

    Decode (T = 1) puts only heads on the M side. BLOCK_H may exceed H (masked rows) so that M >= 16.
    At full size (64 heads x 128) that is 16 queries x 8 heads: M = 128, one warp-group MMA per 64 rows
    (compile report, bench/kernel_report.py). Warps and stages: FORWARD_LAUNCH and BACKWARD_LAUNCH.
    """
    block_t = 1 if t_len == 1 else min(16, triton.next_power_of_2(t_len))
    block_h = min(triton.next_power_of_2(n_heads), max(1, 128 // block_t))
    block_h = max(block_h, 16 // block_t)
    return block_t, block_h, 64, pow2(dim)


def _launch_forward(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, k_scale: torch.Tensor | None
) -> torch.Tensor:
    batch, t_len, n_heads, dim = q.shape
    s_len = k.shape[1]
    assert k.shape == (batch, s_len, dim) and w.shape == (batch, t_len, n_heads), "shape mismatch"
    assert t_len <= s_len, "queries are the last T of S positions"
    q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
    out = torch.empty(batch, t_len, s_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    block_t, block_h, block_s, block_d = _blocks(t_len, n_heads, dim)
    ks = k_scale.contiguous() if k_scale is not None else w  # dummy pointer when unused
    grid = (triton.cdiv(s_len, block_s), triton.cdiv(t_len, block_t), batch)
    _indexer_fwd_kernel[grid](
        q, k, w, ks, out,
        t_len, s_len, n_heads, dim, s_len - t_len,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1),
        w.stride(0), w.stride(1),
        ks.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d,
        HAS_KSCALE=k_scale is not None, INTERP=INTERPRET, IEEE=q.dtype == torch.float32,
        **FORWARD_LAUNCH,
    )
    return out


def _launch_backward(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, t_len, n_heads, dim = q.shape
    s_len = k.shape[1]
    grad = grad.contiguous().float()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=q.device)
    if grad.numel() == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype)
    block_t, block_h, block_s, block_d = _blocks(t_len, n_heads, dim)
    common = dict(
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d,
        INTERP=INTERPRET, IEEE=q.dtype == torch.float32, **BACKWARD_LAUNCH,
    )
    strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        grad.stride(0), grad.stride(1),
    )
    grid_q = (triton.cdiv(t_len, block_t), triton.cdiv(n_heads, block_h), batch)
    _indexer_bwd_dq_dw_kernel[grid_q](
        q, k, w, grad, dq, dw, t_len, s_len, n_heads, dim, s_len - t_len, *strides, **common
    )
    grid_k = (triton.cdiv(s_len, block_s), batch)
    _indexer_bwd_dk_kernel[grid_k](
        q, k, w, grad, dk, t_len, s_len, n_heads, dim, s_len - t_len, *strides, **common
    )
    return dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype)


class IndexerScoresFn(torch.autograd.Function):
    """Autograd wrapper: forward and backward both in Triton, nothing [T, H, S]-sized is saved."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
        ctx.save_for_backward(q, k, w)
        return _launch_forward(q, k, w, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        q, k, w = ctx.saved_tensors
        return _launch_backward(q, k, w, grad)


def indexer_scores_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Triton `indexer_scores` (same contract as the reference), differentiable in q, k and w."""
    return IndexerScoresFn.apply(q, k, w)


# ----------------------------------------------------------------------------------------------------------
# FP8 path: Hadamard rotation + e4m3 with power-of-two scales
# ----------------------------------------------------------------------------------------------------------


def hadamard_matrix(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [n, n] (n a power of two): H H^T = I, so (qH) . (kH) = q . k."""
    assert n > 0 and n & (n - 1) == 0, "Hadamard rotation needs a power-of-two dim"
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H over the last dim, in fp32. Spreads outlier channels so one e4m3 scale fits every channel."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


def quantize_fp8_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) e4m3 quantisation with a power-of-two scale: x ~= x_q * scale.

    scale = 2^ceil(log2(amax / 448)), so x / scale fits e4m3's range and dividing by the scale is exact
    (only the mantissa rounding of the e4m3 cast loses information). Returns (x_q, scale[..., ]).
    """
    amax = x.float().abs().amax(-1).clamp(min=1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_E4M3_MAX)))
    x_q = (x.float() / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return x_q, scale


def quantize_indexer_fp8(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_fp8, k_fp8, w_folded, k_scale): rotate, quantise, fold q's per-(token, head) scale into w."""
    q_fp8, q_scale = quantize_fp8_e4m3(hadamard_rotate(q))
    k_fp8, k_scale = quantize_fp8_e4m3(hadamard_rotate(k))
    return q_fp8, k_fp8, w.float() * q_scale, k_scale


def indexer_scores_fp8_reference(
    q_fp8: torch.Tensor, k_fp8: torch.Tensor, w_folded: torch.Tensor, k_scale: torch.Tensor
) -> torch.Tensor:
    """PyTorch oracle of the FP8 kernel on already-quantised inputs (dequantised products in fp32)."""
    logits = torch.einsum("bthd,bsd->bths", q_fp8.float(), k_fp8.float()).relu()
    scores = torch.einsum("bths,bth->bts", logits, w_folded.float()) * k_scale.float()[:, None, :]
    t_len, s_len = q_fp8.shape[1], k_fp8.shape[1]
    t = torch.arange(t_len, device=q_fp8.device)[:, None] + s_len - t_len
    visible = torch.arange(s_len, device=q_fp8.device)[None, :] <= t
    return scores.masked_fill(~visible, float("-inf"))


def indexer_scores_fp8_triton(
    q_fp8: torch.Tensor, k_fp8: torch.Tensor, w_folded: torch.Tensor, k_scale: torch.Tensor
) -> torch.Tensor:
    """FP8 indexer scores (forward only: the FP8 path serves inference; training uses bf16)."""
    return _launch_forward(q_fp8, k_fp8, w_folded.float(), k_scale.float())
