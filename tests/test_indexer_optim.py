"""trainer/indexer_optim.py on its own (one process): it is torch's AdamW after a clip of the indexer's own
gradient norm, keeps fp32 masters for bf16 parameters, resumes exactly from its state, and steps nothing when
the indexer has no gradient or a non-finite one."""

from __future__ import annotations

import math

import torch

from trainer.indexer_optim import IndexerOptimizer


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in [(4, 3), (5,)]]


def _grads(params, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.dtype)


def test_step_is_adamw_after_its_own_clip():
    mine, ref = _params(), _params()
    opt = IndexerOptimizer(mine, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, max_norm=1.0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step, scale in enumerate([10.0, 0.01, 3.0]):  # clipped, not clipped, clipped
        _grads(mine, scale, step)
        _grads(ref, scale, step)
        expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in ref])).item()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        assert opt.step() == expected_norm
        for a, b in zip(mine, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
            assert a.grad is None  # cleared
        ref_opt.zero_grad()


def test_bf16_parameters_step_through_fp32_masters_and_resume_exactly():
    params = _params(torch.bfloat16)
    opt = IndexerOptimizer(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, max_norm=1.0)
    assert all(m.dtype == torch.float32 for m in opt.masters)
    _grads(params, 1.0, 0)
    opt.step()
    # lr 1e-3 moves each weight by ~1e-3, under bf16's resolution near 1: the fp32 masters keep what bf16 drops
    assert any(not torch.equal(m, p.float()) for m, p in zip(opt.masters, params, strict=True))
    for m, p in zip(opt.masters, params, strict=True):
        assert torch.equal(m.to(torch.bfloat16), p.detach())
    state = opt.state_dict()

    _grads(params, 1.0, 1)
    opt.step()
    after = [p.detach().clone() for p in params]

    fresh_params = _params(torch.bfloat16, seed=7)  # other weights: the state must bring back the masters
    fresh = IndexerOptimizer(fresh_params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, max_norm=1.0)
    fresh.load_state_dict(state)
    _grads(fresh_params, 1.0, 1)
    fresh.step()
    for a, b in zip(after, fresh_params, strict=True):
        assert torch.equal(a, b.detach())


def test_no_gradient_or_a_non_finite_one_steps_nothing():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = IndexerOptimizer(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, max_norm=1.0)
    assert opt.step() is None  # SFT: the LM loss gives the indexer no gradient, weight decay does not run
    _grads(params, 1.0, 0)
    params[0].grad[0, 0] = float("inf")
    assert math.isinf(opt.step()) and opt.steps_skipped == 1
    for a, b in zip(params, before, strict=True):
        assert torch.equal(a.detach(), b) and a.grad is None
    assert not opt.optimizer.state  # no moments were touched
