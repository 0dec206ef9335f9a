"""Triton DSA kernels against their PyTorch references (forward and gradients).

On CPU the kernels run in Triton's numpy interpreter (TRITON_INTERPRET=1, set here before Triton is
imported), so shapes are small; lengths are chosen to straddle the block sizes (1, 7, 33, 70 against
blocks of 16/64), to fall below index_topk, and to include -1 padding in the index lists. On a GPU
machine run with TRITON_INTERPRET=0 and the same tests use CUDA tensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels._triton_common import INTERPRET  # noqa: E402
from kernels.indexer import indexer_scores, indexer_scores_reference  # noqa: E402
from kernels.indexer_loss import indexer_kl_loss, indexer_kl_loss_reference  # noqa: E402
from kernels.indexer_loss_triton import indexer_kl_loss_triton, indexer_kl_per_query_triton  # noqa: E402
from kernels.indexer_triton import (  # noqa: E402
    hadamard_matrix,
    hadamard_rotate,
    indexer_scores_fp8_reference,
    indexer_scores_fp8_triton,
    indexer_scores_triton,
    quantize_fp8_e4m3,
    quantize_indexer_fp8,
)
from kernels.sparse_mla import sparse_mla_attention, sparse_mla_attention_reference  # noqa: E402
from kernels.sparse_mla_triton import attention_lse, sparse_mla_attention_triton  # noqa: E402
from kernels.topk import topk_indices, topk_indices_reference  # noqa: E402
from kernels.topk_triton import topk_indices_triton  # noqa: E402

if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)


def _causal_random_scores(batch: int, t_len: int, s_len: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.randn(batch, t_len, s_len, generator=gen)
    future = torch.arange(s_len)[None, :] > torch.arange(t_len)[:, None] + (s_len - t_len)
    return scores.masked_fill(future, float("-inf")).to(DEVICE)


def _assert_same_selection(scores: torch.Tensor, got: torch.Tensor, k: int) -> None:
    """Tie-aware exactness: same shape, same number of used slots, same multiset of selected scores as
    torch.topk, no repeated position, and every used slot holds a finite (selectable) score."""
    want = topk_indices_reference(scores, k)
    assert got.shape == want.shape and got.dtype == torch.int64
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1))

    def picked(idx: torch.Tensor) -> torch.Tensor:
        values = scores.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
        return values.sort(-1).values

    assert torch.equal(picked(got), picked(want))
    used = got >= 0
    assert torch.isfinite(scores.gather(-1, got.clamp(min=0))[used]).all()
    # Used slots come first, then -1 padding (the reference's layout).
    assert torch.equal(used.int(), used.int().sort(dim=-1, descending=True, stable=True).values)
    for row in got.reshape(-1, got.shape[-1]).cpu():
        sel = row[row >= 0]
        assert sel.unique().numel() == sel.numel()


# ----------------------------------------------------------------------------------------------------------
# Lightning indexer
# ----------------------------------------------------------------------------------------------------------

INDEXER_SHAPES = [  # (B, T, S, H, D): decode (T = 1), T = S prefill, chunked prefill (T < S), odd D
    (1, 1, 1, 2, 16),
    (1, 1, 70, 4, 32),
    (2, 7, 7, 3, 16),
    (1, 33, 70, 4, 32),
    (1, 70, 70, 2, 20),
]


@pytest.mark.parametrize("shape", INDEXER_SHAPES)
def test_indexer_forward_and_gradients_match_reference(shape: tuple[int, ...]) -> None:
    batch, t_len, s_len, heads, dim = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, t_len, heads, dim, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(batch, s_len, dim, generator=gen).to(DEVICE).requires_grad_()
    w = torch.rand(batch, t_len, heads, generator=gen).to(DEVICE).requires_grad_()
    got = indexer_scores_triton(q, k, w)
    want = indexer_scores_reference(q, k, w)
    assert got.dtype == torch.float32 and got.shape == (batch, t_len, s_len)
    visible = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), visible)
    assert (got[~visible] == float("-inf")).all()
    torch.testing.assert_close(got[visible], want[visible], rtol=1e-5, atol=1e-5)

    upstream = torch.randn(want.shape, generator=gen).to(DEVICE)
    grads_got = torch.autograd.grad((got.masked_fill(~visible, 0) * upstream).sum(), (q, k, w))
    grads_want = torch.autograd.grad((want.masked_fill(~visible, 0) * upstream).sum(), (q, k, w))
    for name, g, r in zip(("dq", "dk", "dw"), grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_indexer_bf16_inputs_close_to_fp32_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 33, 4, 32, generator=gen).to(DEVICE, torch.bfloat16)
    k = torch.randn(1, 70, 32, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.rand(1, 33, 4, generator=gen).to(DEVICE)
    got = indexer_scores_triton(q, k, w)
    want = indexer_scores_reference(q, k, w)  # same bf16 values, products in fp32
    visible = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), visible)
    torch.testing.assert_close(got[visible], want[visible], rtol=1e-3, atol=1e-3)


def test_hadamard_rotation_is_orthogonal_and_preserves_dot_products() -> None:
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 64, generator=gen), torch.randn(7, 64, generator=gen)
    torch.testing.assert_close(hadamard_rotate(q) @ hadamard_rotate(k).T, q @ k.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        hadamard_matrix(48)


def test_fp8_quantisation_uses_power_of_two_scales_within_range() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 64, generator=gen) * torch.logspace(-3, 3, 6)[:, None, None]
    x_q, scale = quantize_fp8_e4m3(x)
    assert x_q.dtype == torch.float8_e4m3fn and scale.shape == (6, 3)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    assert x_q.float().abs().max() <= 448
    # The scale is the smallest power of two that fits: amax / scale in (224, 448].
    ratio = x.abs().amax(-1) / scale
    assert ((ratio > 224) & (ratio <= 448)).all()
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 on values away from the subnormals.
    back = x_q.float() * scale[..., None]
    big = x.abs() > scale[..., None]
    assert ((back - x).abs()[big] <= x.abs()[big] * 2**-4 + 1e-12).all()


@pytest.mark.parametrize("shape", [(1, 1, 70, 4, 32), (1, 33, 70, 4, 64)])
def test_fp8_indexer_kernel_matches_its_reference_and_approximates_bf16(shape: tuple[int, ...]) -> None:
    batch, t_len, s_len, heads, dim = shape
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(batch, t_len, heads, dim, generator=gen).to(DEVICE)
    k = torch.randn(batch, s_len, dim, generator=gen).to(DEVICE)
    w = torch.rand(batch, t_len, heads, generator=gen).to(DEVICE)
    q_fp8, k_fp8, w_folded, k_scale = quantize_indexer_fp8(q, k, w)
    assert q_fp8.dtype == k_fp8.dtype == torch.float8_e4m3fn
    got = indexer_scores_fp8_triton(q_fp8, k_fp8, w_folded, k_scale)
    oracle = indexer_scores_fp8_reference(q_fp8, k_fp8, w_folded, k_scale)
    exact = indexer_scores_reference(q, k, w)
    visible = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), visible)
    torch.testing.assert_close(got[visible], oracle[visible], rtol=1e-5, atol=1e-5)
    # FP8 rounding only: error small against the scores' spread.
    assert (got[visible] - exact[visible]).abs().max() < 0.1 * exact[visible].abs().max()


# ----------------------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t_len", "s_len", "k"),
    [(1, 1, 4), (1, 7, 4), (7, 7, 16), (33, 70, 8), (4, 70, 70), (3, 1500, 100)],
)
def test_topk_selects_the_same_set_as_torch_topk(t_len: int, s_len: int, k: int) -> None:
    gen = torch.Generator().manual_seed(t_len * 1000 + s_len + k)
    scores = _causal_random_scores(2, t_len, s_len, gen)
    _assert_same_selection(scores, topk_indices_triton(scores, k), k)


def test_topk_exact_under_heavy_ties_zeros_and_negative_scores() -> None:
    gen = torch.Generator().manual_seed(11)
    scores = _causal_random_scores(1, 33, 70, gen)
    # ReLU sums tie at exactly 0; rounding makes many equal values straddle the k-th position.
    tied = (scores * 2).round().clamp(min=0).masked_fill(~torch.isfinite(scores), float("-inf"))
    _assert_same_selection(tied, topk_indices_triton(tied, 8), 8)
    negative = -tied.abs() - 1.0
    _assert_same_selection(negative, topk_indices_triton(negative, 8), 8)
    # Small radix digits and a block that does not divide S exercise the multi-pass, multi-block path.
    _assert_same_selection(scores, topk_indices_triton(scores, 8, block=16, radix_bits=4), 8)


def test_topk_rows_with_nothing_selectable_are_all_padding() -> None:
    scores = torch.full((1, 3, 20), float("-inf"), device=DEVICE)
    scores[0, 1, 5] = 2.0
    got = topk_indices_triton(scores, 4)
    assert (got[0, 0] == -1).all() and (got[0, 2] == -1).all()
    assert got[0, 1].tolist() == [5, -1, -1, -1]


@pytest.mark.slow
def test_topk_long_row_full_size_k() -> None:
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(1, 2, 9000, generator=gen).to(DEVICE)
    _assert_same_selection(scores, topk_indices_triton(scores, 2048), 2048)


# ----------------------------------------------------------------------------------------------------------
# Sparse MLA attention
# ----------------------------------------------------------------------------------------------------------

MLA_SHAPES = [  # (B, T, S, H, dv, d_rope, index_topk)
    (1, 1, 7, 2, 32, 16, 4),
    (2, 7, 7, 3, 32, 16, 16),  # index_topk > S: every causal position, S-wide index lists
    (1, 33, 70, 4, 32, 16, 16),
    (1, 70, 70, 2, 24, 8, 8),  # dims that are not powers of two
]


def _mla_inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    batch, t_len, s_len, heads, dv, dr, topk = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, t_len, heads, dv + dr, generator=gen).to(DEVICE, dtype).requires_grad_()
    kv = torch.randn(batch, s_len, dv + dr, generator=gen).to(DEVICE, dtype).requires_grad_()
    indices = topk_indices_reference(_causal_random_scores(batch, t_len, s_len, gen), topk)
    return q, kv, indices, (dv + dr) ** -0.5, dv, gen


@pytest.mark.parametrize("shape", MLA_SHAPES)
@pytest.mark.parametrize("mode", ["sparse", "padded", "dense"])
def test_sparse_mla_forward_and_gradients_match_reference(shape: tuple[int, ...], mode: str) -> None:
    q, kv, indices, scale, dv, gen = _mla_inputs(shape)
    if mode == "dense":
        indices = None
    elif mode == "padded":
        # Padding slots (-1) and a future position (ignored by the causal mask, as in the reference).
        indices = indices.clone()
        indices[..., -1] = -1
        if q.shape[1] > 1:
            indices[:, 0, -2] = kv.shape[1] - 1  # the last position is in query 0's future
    out, lse = sparse_mla_attention_triton(q, kv, indices, scale, dv)
    ref_out, ref_lse = sparse_mla_attention_reference(q, kv, indices, scale, dv)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    rows = finite[..., None].expand_as(ref_out)
    torch.testing.assert_close(out[rows], ref_out[rows], rtol=1e-5, atol=1e-5)

    dout = torch.randn(ref_out.shape, generator=gen).to(DEVICE).masked_fill(~rows, 0)
    got = torch.autograd.grad((out.masked_fill(~rows, 0) * dout).sum(), (q, kv))
    want = torch.autograd.grad((ref_out.masked_fill(~rows, 0) * dout).sum(), (q, kv))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4, msg=lambda m: f"dq: {m}")
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4, msg=lambda m: f"dkv: {m}")


def test_sparse_mla_bf16_close_to_reference() -> None:
    q, kv, indices, scale, dv, _ = _mla_inputs((1, 33, 70, 4, 32, 16, 16), torch.bfloat16)
    out, lse = sparse_mla_attention_triton(q, kv, indices, scale, dv)
    ref_out, ref_lse = sparse_mla_attention_reference(q.float(), kv.float(), indices, scale, dv)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert q.grad is not None and kv.grad is not None and torch.isfinite(kv.grad.float()).all()


def test_attention_lse_matches_reference_lse() -> None:
    q, kv, indices, scale, dv, _ = _mla_inputs((1, 33, 70, 4, 32, 16, 16))
    for idx in (indices, None):
        want = sparse_mla_attention_reference(q, kv, idx, scale, dv)[1]
        got = attention_lse(q.detach(), kv.detach(), idx, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sparse_mla_full_width_latent() -> None:
    """The real MLA widths: 576-wide entries (512 latent + 64 RoPE), 512-wide values."""
    q, kv, indices, scale, dv, gen = _mla_inputs((1, 5, 40, 16, 512, 64, 16))
    out, lse = sparse_mla_attention_triton(q, kv, indices, scale, dv)
    ref_out, ref_lse = sparse_mla_attention_reference(q, kv, indices, scale, dv)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    dout = torch.randn(ref_out.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad((out * dout).sum(), (q, kv))
    want = torch.autograd.grad((ref_out * dout).sum(), (q, kv))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Indexer KL loss
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", MLA_SHAPES)
@pytest.mark.parametrize("stage", ["dense", "sparse"])
@pytest.mark.parametrize("masked", [False, True])
def test_indexer_kl_loss_and_gradient_match_reference(
    shape: tuple[int, ...], stage: str, masked: bool
) -> None:
    q, kv, indices, scale, _, gen = _mla_inputs(shape)
    q, kv = q.detach(), kv.detach()
    batch, t_len, s_len = q.shape[0], q.shape[1], kv.shape[1]
    index_scores = (_causal_random_scores(batch, t_len, s_len, gen) * 3).requires_grad_()
    if stage == "dense":
        indices = None
    else:
        indices = indices.clone()
        indices[..., -1] = -1  # padding slot
    query_mask = (torch.rand(batch, t_len, generator=gen) > 0.3).to(DEVICE) if masked else None
    got = indexer_kl_loss_triton(q, kv, scale, index_scores, indices, query_mask)
    want = indexer_kl_loss_reference(q, kv, scale, index_scores, indices, query_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, index_scores)
    (g_want,) = torch.autograd.grad(want, index_scores)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


def test_indexer_kl_accepts_the_attention_lse() -> None:
    q, kv, indices, scale, dv, gen = _mla_inputs((1, 33, 70, 4, 32, 16, 16))
    q, kv = q.detach(), kv.detach()
    index_scores = _causal_random_scores(1, 33, 70, gen)
    _, lse = sparse_mla_attention_triton(q, kv, indices, scale, dv)
    per_query = indexer_kl_per_query_triton(q, kv, scale, index_scores, indices, lse=lse)
    recomputed = indexer_kl_per_query_triton(q, kv, scale, index_scores, indices)
    assert per_query.shape == (1, 33) and (per_query >= -1e-6).all()  # KL is non-negative
    torch.testing.assert_close(per_query, recomputed, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The DSA pipeline end to end, and the dispatchers
# ----------------------------------------------------------------------------------------------------------


def test_dsa_pipeline_gradients_reach_the_indexer_only_through_the_kl_loss() -> None:
    """indexer -> top-k -> sparse MLA -> (LM-style loss + indexer KL), Triton vs references."""
    gen = torch.Generator().manual_seed(7)
    batch, t_len, heads, dv, dr, i_heads, i_dim, topk = 1, 33, 4, 32, 16, 2, 16, 8

    def leaf(*shape: int, rand: bool = False) -> torch.Tensor:
        x = torch.rand(*shape, generator=gen) if rand else torch.randn(*shape, generator=gen)
        return x.to(DEVICE).requires_grad_()

    iq, ik = leaf(batch, t_len, i_heads, i_dim), leaf(batch, t_len, i_dim)
    iw = leaf(batch, t_len, i_heads, rand=True)
    q, kv = leaf(batch, t_len, heads, dv + dr), leaf(batch, t_len, dv + dr)
    scale = (dv + dr) ** -0.5

    with torch.no_grad():
        ref_scores = indexer_scores_reference(iq, ik, iw)
    indices = topk_indices_reference(ref_scores, topk)
    _assert_same_selection(ref_scores, topk_indices_triton(ref_scores, topk), topk)  # ReLU zeros tie

    def run(scores_fn, attn_fn, loss_fn):
        # One index set for both paths: scores that differ in the last bit could flip a near-tie.
        scores = scores_fn(iq, ik, iw)
        out, _ = attn_fn(q, kv, indices, scale, dv)
        loss = out.square().mean() + loss_fn(q.detach(), kv.detach(), scale, scores, indices)
        return torch.autograd.grad(loss, (iq, ik, iw, q, kv))

    grads_t = run(indexer_scores_triton, sparse_mla_attention_triton, indexer_kl_loss_triton)
    grads_r = run(indexer_scores_reference, sparse_mla_attention_reference, indexer_kl_loss_reference)
    for name, g, r in zip(("iq", "ik", "iw", "q", "kv"), grads_t, grads_r, strict=True):
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_dispatch_keeps_the_reference_on_cpu_and_routes_cuda_to_triton() -> None:
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 7, 2, 16, generator=gen), torch.randn(1, 7, 16, generator=gen)
    w = torch.rand(1, 7, 2, generator=gen)
    scores = indexer_scores(q, k, w)
    assert torch.equal(scores, indexer_scores_reference(q, k, w))
    assert torch.equal(topk_indices(scores, 4), topk_indices_reference(scores, 4))
    mq, mkv = torch.randn(1, 7, 2, 48, generator=gen), torch.randn(1, 7, 48, generator=gen)
    idx = topk_indices(scores, 4)
    got = sparse_mla_attention(mq, mkv, idx, 0.1, 32)
    want = sparse_mla_attention_reference(mq, mkv, idx, 0.1, 32)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(
        indexer_kl_loss(mq, mkv, 0.1, scores, idx), indexer_kl_loss_reference(mq, mkv, 0.1, scores, idx)
    )
    if torch.cuda.is_available() and not INTERPRET:
        cuda_scores = indexer_scores(q.cuda(), k.cuda(), w.cuda())
        assert cuda_scores.grad_fn is not None and "IndexerScoresFn" in type(cuda_scores.grad_fn).__name__


def test_bench_without_gpu_explains_and_exits_zero() -> None:
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench would run for real")
    bench = Path(__file__).resolve().parents[1] / "bench" / "dsa_kernels.py"
    done = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "--cpu-smoke" in done.stdout


@pytest.mark.slow
def test_bench_cpu_smoke_runs_every_path() -> None:
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "dsa_kernels.py"
    command = [sys.executable, str(bench), "--cpu-smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.strip().startswith(("64 |", "96 |"))]
    assert len(rows) == 2 and "nan" not in " ".join(rows)


@pytest.mark.slow
def test_full_size_indexer_and_kl_loss() -> None:
    """Indexer at 64 heads x 128 and the sparse KL over 576-wide entries, 16 heads."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 5, 64, 128, generator=gen).to(DEVICE)
    k = torch.randn(1, 40, 128, generator=gen).to(DEVICE)
    w = (torch.rand(1, 5, 64, generator=gen) / 8).to(DEVICE)
    scores = indexer_scores_triton(q, k, w)
    want = indexer_scores_reference(q, k, w)
    visible = torch.isfinite(want)
    torch.testing.assert_close(scores[visible], want[visible], rtol=1e-5, atol=1e-4)
    mq, mkv, indices, scale, _, _ = _mla_inputs((1, 5, 40, 16, 512, 64, 16))
    mq, mkv = mq.detach(), mkv.detach()
    index_scores = want.clone().requires_grad_()
    got = indexer_kl_loss_triton(mq, mkv, scale, index_scores, indices)
    ref = indexer_kl_loss_reference(mq, mkv, scale, index_scores, indices)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, index_scores)
    (g_ref,) = torch.autograd.grad(ref, index_scores)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)
