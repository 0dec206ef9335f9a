"""The trainer's optimisation on a real DeepSpeed engine (gloo, fp32, ZeRO-1/2), without Ray: the indexer's own
optimiser (neither loss scales the other's update; its state resumes exactly; its gradients are averaged over
ranks), `grpo.old_logprobs`, and the learning rates an SFT step sets after GRPO.

Each test starts from the state the fixture saved (`fresh`), so the tests do not depend on each other's order.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import socket
from pathlib import Path

import pytest
import torch
from test_trainer import GRPO, TRAINER, sampled_batch  # tests/ is on sys.path (pytest's rootdir-relative import)
from transformers import DeepseekV32Config

import trainer.objective as objective
from rl.algo.batch import with_columns
from rl.model.checkpoint import build_model, save_checkpoint
from rl.model.presets import preset

pytestmark = pytest.mark.slow

LR, INDEXER_LR = 1e-3, 3e-3
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _initial_checkpoint(directory: Path) -> Path:
    model = build_model(DeepseekV32Config(**preset("tiny", initializer_range=0.1)), seed=0)
    save_checkpoint(model, directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from trainer.worker import TrainerWorker

    root = tmp_path_factory.mktemp("optim")
    path = _initial_checkpoint(root / "init")
    grpo = dataclasses.replace(GRPO, indexer_lr=INDEXER_LR)
    w = TrainerWorker(0, 1, "127.0.0.1", _port(), str(path), str(path), grpo, TRAINER, lr=LR, seed=0)
    sampler = build_model(DeepseekV32Config(**preset("tiny", initializer_range=0.1)), seed=0).eval()
    batch = sampled_batch(sampler, 8, ADVANTAGES)
    w.grpo_step(batch)  # two mini-batch updates: every optimiser has moments to carry
    w.save(str(root / "fresh"))
    return w, sampler, batch, root / "fresh"


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    indexer = {k: v for k, v in state.items() if ".indexer." in k}
    return {k: v for k, v in state.items() if k not in indexer}, indexer


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _grpo_from(setup, batch=None, **changes) -> tuple[dict, dict]:
    """Reload the saved state, take one GRPO step with `changes` to the grpo options, return (metrics, weights)."""
    w, _, default_batch, fresh = setup
    w.load_optimizer(str(fresh))
    saved = {k: getattr(w.grpo, k) for k in changes}
    for k, v in changes.items():
        setattr(w.grpo, k, v)
    try:
        m = w.grpo_step(default_batch if batch is None else batch)
    finally:
        for k, v in saved.items():
            setattr(w.grpo, k, v)
    return m, w.state_dict()


def test_the_indexer_and_the_policy_do_not_scale_each_others_update(setup, monkeypatch):
    """One optimiser update (mini_batch_size 8) from a state with AdamW moments. Over several updates the two
    stay coupled the way the model couples them (the indexer reads the backbone's hidden states), but no
    update of one is scaled by the other's gradient."""
    one = {"mini_batch_size": 8}
    base_m, base = _grpo_from(setup, **one)
    base_policy, base_indexer = _split(base)

    # Resuming is exact, the indexer's own AdamW moments included (without them the indexer would differ).
    _, again = _grpo_from(setup, **one)
    assert _equal(again, base)

    # The indexer loss x1000: its gradient norm is far over every clip, yet the policy's update is unchanged.
    big_m, big = _grpo_from(setup, indexer_loss_coef=1000.0, **one)
    big_policy, big_indexer = _split(big)
    assert big_m["indexer_grad_norm"] > 100 * max(GRPO.grad_clip, GRPO.indexer_grad_clip)
    assert big_m["indexer_grad_norm"] == pytest.approx(1000 * base_m["indexer_grad_norm"], rel=1e-4)
    assert big_m["grad_norm"] == pytest.approx(base_m["grad_norm"], rel=1e-6)
    assert _equal(big_policy, base_policy)
    assert not _equal(big_indexer, base_indexer)  # the indexer's own clip did act on its larger gradient

    # The policy loss x1000: the indexer's update is unchanged.
    real = objective.grpo_loss

    def scaled(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return 1000.0 * loss, metrics

    monkeypatch.setattr(objective, "grpo_loss", scaled)
    loud_m, loud = _grpo_from(setup, **one)
    loud_policy, loud_indexer = _split(loud)
    assert loud_m["grad_norm"] > 100 * max(GRPO.grad_clip, GRPO.indexer_grad_clip)
    assert loud_m["indexer_grad_norm"] == base_m["indexer_grad_norm"]
    assert _equal(loud_indexer, base_indexer)
    assert not _equal(loud_policy, base_policy)


def test_trainer_old_logprobs_start_the_ratio_at_one_while_the_mask_uses_the_engines(setup):
    w, _, _, fresh = setup
    # A batch sampled from the weights the steps below start from: pi_samp = the trainer's policy.
    w.load_optimizer(str(fresh))
    sampler = build_model(DeepseekV32Config(**preset("tiny", initializer_range=0.1)), seed=0)
    sampler.load_state_dict(w.state_dict())
    batch = sampled_batch(sampler.eval(), 8, ADVANTAGES)
    # The engine reports every sampled token 0.7 nats likelier than the trainer computes it (delta is 0.5):
    # the mask drops the four negative-advantage rows whichever pi_old the ratio uses.
    shifted = [[x + 0.7 for x in row] for row in batch.column("rollout_logprobs").to_pylist()]
    offset = with_columns(batch, rollout_logprobs=shifted)

    trainer_m, _ = _grpo_from(setup, offset, old_logprobs="trainer", mini_batch_size=8)  # one update
    assert trainer_m["ratio_max"] == 1.0 and trainer_m["ratio_mean"] == 1.0 and trainer_m["clip_frac"] == 0.0
    assert trainer_m["masked_seq_frac"] == 0.5
    assert trainer_m["logp_mismatch"] == pytest.approx(0.7, abs=1e-4)  # against the engine's, not pi_old's

    # With "engine" the offset is in the ratio (e^-0.7, clipped for every A < 0 token), and the same rows drop.
    engine_m, _ = _grpo_from(setup, offset, old_logprobs="engine", mini_batch_size=8)
    assert engine_m["ratio_mean"] == pytest.approx(math.exp(-0.7), rel=1e-4) and engine_m["clip_frac"] == 0.5
    assert engine_m["masked_seq_frac"] == 0.5
    # Unshifted, the two modes agree (CPU fp32: the engine's log-probs are the trainer's, here to ~1e-6).
    plain_engine, _ = _grpo_from(setup, batch, old_logprobs="engine", mini_batch_size=8)
    plain_trainer, _ = _grpo_from(setup, batch, old_logprobs="trainer", mini_batch_size=8)
    assert plain_engine["ratio_max"] == pytest.approx(1.0, abs=1e-5) and plain_trainer["ratio_max"] == 1.0
    assert plain_engine["masked_seq_frac"] == plain_trainer["masked_seq_frac"] == 0.0
    assert plain_engine["loss"] == pytest.approx(plain_trainer["loss"], abs=1e-5)

    # Without the mask, "trainer" uses the engine's log-probs for nothing: the offset leaves its update as it
    # is. With "engine" they are pi_old, and the offset changes the update.
    no_mask = {"offpolicy_delta": None, "mini_batch_size": 8}
    _, trainer_offset = _grpo_from(setup, offset, old_logprobs="trainer", **no_mask)
    _, trainer_plain = _grpo_from(setup, batch, old_logprobs="trainer", **no_mask)
    assert _equal(_split(trainer_offset)[0], _split(trainer_plain)[0])
    _, engine_offset = _grpo_from(setup, offset, old_logprobs="engine", **no_mask)
    _, engine_plain = _grpo_from(setup, batch, old_logprobs="engine", **no_mask)
    assert not _equal(_split(engine_offset)[0], _split(engine_plain)[0])


def test_sft_after_grpo_moves_every_group_by_its_own_learning_rate(setup):
    """An SFT step at lr L sets every group to L x (its base lr / the first group's): AdamW's update is linear
    in the learning rate, so from the same state 2L moves each trained parameter exactly twice as far. The LM
    loss gives the indexer no gradient: its own optimiser does not step, and it does not move."""
    w, _, _, fresh = setup
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 54, (4, 12), generator=gen)
    mask = torch.ones(4, 11)
    mask[:, :4] = 0

    def sft(lr: float) -> tuple[dict, dict, list[float]]:
        w.load_optimizer(str(fresh))
        before = w.state_dict()
        m = w.sft_step(ids[:, :-1], ids[:, 1:], mask, lr=lr)
        assert m["skipped"] == 0.0
        after = w.state_dict()
        return {k: after[k] - before[k] for k in after}, before, [g["lr"] for g in w.param_groups()]

    one, _, lrs_one = sft(1e-3)
    two, _, lrs_two = sft(2e-3)
    assert len(lrs_one) == 2  # the backbone's group, the indexer's own optimiser's
    assert lrs_one == pytest.approx([1e-3, 1e-3 * INDEXER_LR / LR]) and lrs_two == pytest.approx([2e-3, 6e-3])
    policy_one, indexer_one = _split(one)
    policy_two, indexer_two = _split(two)
    moved = [k for k in policy_one if policy_one[k].abs().max() > 0]
    assert len(moved) > 0.9 * len(policy_one)
    for k in moved:  # float32 parameters: the differences are exact to a few ulps of the parameters
        torch.testing.assert_close(policy_two[k], 2 * policy_one[k], rtol=1e-3, atol=5e-7)
        assert policy_two[k].norm() / policy_one[k].norm() == pytest.approx(2.0, rel=1e-3), k
    assert all(v.abs().max() == 0 for v in indexer_one.values())
    assert all(v.abs().max() == 0 for v in indexer_two.values())


# ---- two ranks --------------------------------------------------------------------------------------------


def _rank_main(rank: int, port: int, world: int, checkpoint: str, zero_stage: int, out: str) -> None:
    from trainer.worker import TrainerWorker

    torch.set_num_threads(1)
    trainer = dataclasses.replace(TRAINER, num_ranks=world, zero_stage=zero_stage)
    w = TrainerWorker(rank, world, "127.0.0.1", port, checkpoint, checkpoint, dataclasses.replace(GRPO), trainer,
                      lr=LR, seed=0)
    sampler = build_model(DeepseekV32Config(**preset("tiny", initializer_range=0.1)), seed=0).eval()
    batch = sampled_batch(sampler, 8, ADVANTAGES)
    per = batch.num_rows // world
    # mini_batch_size 8 over `world` ranks: each rank's mini-batch is its whole shard, one update.
    w.grpo.mini_batch_size = 8
    m = w.grpo_step(batch.slice(rank * per, per))
    state = {k: v.detach().clone() for k, v in w.model.state_dict().items()}
    torch.save({"state": state, "metrics": m}, f"{out}/rank{rank}.pt")
    w.shutdown()


def spawn_ranks(target, world: int, args: tuple, out: Path, timeout: float = 600) -> list[dict]:
    """Run target(rank, port, *args) in `world` spawned processes (one gloo group on a free port); each rank
    writes out/rank{r}.pt. Returns what they wrote, after asserting that every rank exited cleanly."""
    ctx = multiprocessing.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _run_ranks(world: int, checkpoint: Path, zero_stage: int, out: Path) -> list[dict]:
    return spawn_ranks(_rank_main, world, (world, str(checkpoint), zero_stage, str(out)), out, timeout=300)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple[Path, dict]:
    """The initial checkpoint and what one rank (ZeRO-1) makes of the whole batch in one update."""
    root = tmp_path_factory.mktemp("ranks")
    checkpoint = _initial_checkpoint(root / "init")
    (root / "one").mkdir()
    (one,) = _run_ranks(1, checkpoint, 1, root / "one")
    return checkpoint, one


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_average_the_indexer_gradients(tmp_path, one_rank, zero_stage):
    """Two gloo ranks with half the batch each take the step one rank takes with all of it: the indexer's
    gradients (outside ZeRO's reduction) are averaged before its own step, so both ranks hold the same indexer
    and it equals the single rank's (every row has the same length, so the per-rank means average exactly).
    The two ranks' rows route to different experts: every expert still gets a gradient on both (see MoE)."""
    checkpoint, one = one_rank
    two = _run_ranks(2, checkpoint, zero_stage, tmp_path)
    _, indexer0 = _split(two[0]["state"])
    _, indexer1 = _split(two[1]["state"])
    _, indexer_one = _split(one["state"])
    assert _equal(indexer0, indexer1)
    for k in indexer_one:
        torch.testing.assert_close(indexer0[k], indexer_one[k], rtol=1e-5, atol=1e-6)
    assert two[0]["metrics"]["indexer_grad_norm"] == pytest.approx(one["metrics"]["indexer_grad_norm"], rel=1e-5)
    # the ranks' own (unaveraged) indexer gradients differ: averaging is what made them agree
    assert two[0]["metrics"]["indexer_kl"] != two[1]["metrics"]["indexer_kl"]
    # ZeRO averages the policy's: the same step too. The first AdamW step moves each weight by about lr * sign(g),
    # so an element whose gradient is ~eps may differ by a fraction of lr (1e-3) after the rounding of the average.
    policy0, _ = _split(two[0]["state"])
    policy_one, _ = _split(one["state"])
    for k in policy_one:
        torch.testing.assert_close(policy0[k], policy_one[k], rtol=1e-5, atol=1e-5)
