"""`keel warmup-indexer` on the tiny preset: the pure pieces, the config, and one run end to end.

The end-to-end run is interrupted twice, the way a user would meet it: once at the stage boundary (the run is
stopped after the dense warm-up) and once in the middle of the sparse stage (just after a checkpoint), and
resumed each time; then it is checked for what the recipe promises.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from rl.loop.config import ConfigError
from rl.model.checkpoint import has_indexer, load_model
from rl.model.tokenizer import CharTokenizer
from rl.recipes.warmup_indexer import (
    WarmupRun,
    add_fresh_indexer,
    attended_fraction,
    copy_corpus,
    load_warmup_config,
    lr_at,
    warmup_indexer,
)

RECIPE = Path(__file__).parent.parent / "configs" / "warmup_indexer.yaml"
TINY = [
    "run.threads=1",
    "run.checkpoint_every=10",
    "run.eval_every=20",
    "model.index_topk=8",
    "data.seq_len=64",
    "data.period=16",
    "data.eval_lengths=[32,64]",
    "data.eval_sequences=32",
    "pretrain.steps=300",
    "pretrain.lr=3e-3",
    "dense.steps=60",
    "dense.lr=3e-3",
    "sparse.steps=30",
]
SPARSE_INTERRUPT_STEP = 10


# ---- pure functions and configuration ------------------------------------------------------------------


def test_copy_corpus_repeats_one_segment_and_is_seeded():
    tok = CharTokenizer()
    ids = copy_corpus(4, 40, 16, seed=3, tokenizer=tok)
    assert ids.shape == (4, 41) and (ids[:, 0] == tok.bos_id).all()
    text = ids[:, 1:]
    assert torch.equal(text[:, 16:], text[:, :-16])  # every token after the first period is a copy
    assert torch.equal(ids, copy_corpus(4, 40, 16, seed=3, tokenizer=tok))
    assert not torch.equal(ids, copy_corpus(4, 40, 16, seed=4, tokenizer=tok))
    assert set(tok.decode(text.flatten().tolist())) <= set("abcdefghijklmnopqrstuvwxyz")


def test_attended_fraction_counts_causal_pairs():
    assert attended_fraction(8, 8) == 1.0  # no more tokens than index_topk: dense
    # T=4, k=2: queries see 1, 2, 2, 2 of 1, 2, 3, 4 causal keys.
    assert attended_fraction(4, 2) == pytest.approx(7 / 10)
    assert attended_fraction(64, 8) < 0.25 < attended_fraction(64, 16)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="sparse.bogus"):
        load_warmup_config(None, ["sparse.bogus=1"])
    with pytest.raises(ConfigError, match="dense.steps"):
        load_warmup_config(None, ["dense.steps=many"])
    with pytest.raises(ConfigError, match="--checkpoint"):
        load_warmup_config(None, ["pretrain.steps=0"])
    with pytest.raises(ConfigError, match="index_topk"):
        load_warmup_config(None, ["model.index_topk=128", "data.seq_len=128"])
    cfg = load_warmup_config(RECIPE, ["sparse.steps=7"])
    assert cfg.sparse.steps == 7 and cfg.model.index_topk * 8 <= cfg.data.seq_len


# ---- end to end ------------------------------------------------------------------------------------------


class _Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny recipe stopped after the dense warm-up, resumed and interrupted mid-sparse, resumed again."""
    out = tmp_path_factory.mktemp("warmup")
    cfg = load_warmup_config(RECIPE, TINY + [f"run.output_dir={out}"])
    run_dir = warmup_indexer(cfg, stop_after="dense")
    stage1 = {
        "phases_done": sorted(p.name for p in run_dir.iterdir() if (p / "config.json").exists()),
        "warmup_mtime": (run_dir / "warmup" / "model.safetensors").stat().st_mtime_ns,
    }

    save = WarmupRun.save_phase_checkpoint

    def save_then_interrupt(self, phase, engine, step):
        path = save(self, phase, engine, step)
        if phase == "sparse" and step == SPARSE_INTERRUPT_STEP:
            raise _Interrupt
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WarmupRun, "save_phase_checkpoint", save_then_interrupt)
        with pytest.raises(_Interrupt):
            warmup_indexer(None, resume=str(run_dir))
    interrupted = sorted(p.name for p in (run_dir / "checkpoints" / "sparse").iterdir())

    phases_run = []
    train_phase = WarmupRun.train_phase

    def spy(self, phase, *args, **kwargs):
        phases_run.append(phase)
        return train_phase(self, phase, *args, **kwargs)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(WarmupRun, "train_phase", spy)
        warmup_indexer(None, resume=str(run_dir))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "dir": run_dir, "stage1": stage1, "interrupted": interrupted, "phases_on_last_resume": phases_run,
        "stdout": stdout.getvalue(), "records": records,
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }


def _phase(records, phase):
    return [r for r in records if r["phase"] == phase]


@pytest.mark.slow
def test_stage1_indexer_kl_decreases_and_makes_sparse_attention_work(run):
    dense = [r for r in _phase(run["records"], "dense") if "indexer_kl" in r]
    first = sum(r["indexer_kl"] for r in dense[:5]) / 5
    last = sum(r["indexer_kl"] for r in dense[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    evals = [r["eval/sparse_lm_loss"] for r in _phase(run["records"], "dense") if "eval/sparse_lm_loss" in r]
    assert evals[-1] < 0.5 * evals[0], evals  # top-k over a fresh indexer's picks is far worse than after


@pytest.mark.slow
def test_stage1_leaves_the_backbone_bit_identical(run):
    dense, warm = load_model(run["dir"] / "dense"), load_model(run["dir"] / "warmup")
    assert not dense.with_indexer and warm.with_indexer
    warm_state = warm.state_dict()
    for name, tensor in dense.state_dict().items():
        assert torch.equal(tensor, warm_state[name]), name
    fresh = add_fresh_indexer(dense, warm.config, seed=0).state_dict()
    trained = [n for n in warm_state if ".indexer." in n and not torch.equal(warm_state[n], fresh[n])]
    assert trained, "the indexer did not move in the dense warm-up"


@pytest.mark.slow
def test_dsa_checkpoint_has_an_indexer_and_loads(run):
    dsa_dir = run["dir"] / "dsa"
    assert has_indexer(dsa_dir)
    dsa = load_model(dsa_dir)
    assert dsa.with_indexer and dsa.config.index_topk == 8
    dense = load_model(run["dir"] / "dense").state_dict()
    moved = [n for n, t in dsa.state_dict().items() if n in dense and not torch.equal(t, dense[n])]
    assert moved, "the sparse stage did not train the backbone"


@pytest.mark.slow
def test_sparse_model_matches_dense_at_a_quarter_of_the_attention(run):
    summary = run["summary"]
    longest = summary["rows"][-1]
    assert longest["length"] == 64
    assert longest["topk_over_length"] <= 0.25 and longest["attended_fraction"] <= 0.25
    assert longest["dsa_loss"] <= 1.05 * longest["dense_loss"], longest
    assert longest["warmup_only_loss"] <= 1.05 * longest["dense_loss"], longest  # the same backbone as dense
    assert longest["fresh_indexer_loss"] > 2 * longest["dense_loss"], longest  # the warm-up is what did it
    assert summary["within_5_percent"] and summary["attends_at_most_a_quarter"]
    assert "dsa/dense" in run["stdout"]  # the comparison table was printed


@pytest.mark.slow
def test_resume_picks_up_where_it_stopped(run):
    assert run["stage1"]["phases_done"] == ["dense", "warmup"]
    assert run["interrupted"] == [f"step_{SPARSE_INTERRUPT_STEP}"]
    # The last resume trained only the rest of the sparse stage, from its checkpoint.
    assert run["phases_on_last_resume"] == ["sparse"]
    assert "sparse: resumed from" in run["stdout"] and f"at step {SPARSE_INTERRUPT_STEP}" in run["stdout"]
    assert (run["dir"] / "warmup" / "model.safetensors").stat().st_mtime_ns == run["stage1"]["warmup_mtime"]
    assert not (run["dir"] / "checkpoints" / "sparse").exists()  # superseded by dsa/
    # Every step of every phase is recorded exactly once, in order.
    for phase, steps in (("pretrain", 300), ("dense", 60), ("sparse", 30)):
        logged = [r["step"] for r in _phase(run["records"], phase)]
        assert logged == list(range(steps + 1)), (phase, logged)
    assert all(math.isfinite(r["lm_loss"]) for r in run["records"] if "lm_loss" in r)


@pytest.mark.slow
def test_starts_from_a_dense_checkpoint_and_rejects_a_dsa_one(run, tmp_path):
    base = [o for o in TINY if not o.startswith(("dense.steps", "sparse.steps", "data.eval_sequences"))]
    overrides = base + ["dense.steps=3", "sparse.steps=2", "data.eval_sequences=4", f"run.output_dir={tmp_path}"]
    cfg = load_warmup_config(None, overrides + [f"model.checkpoint={run['dir'] / 'dense'}", "pretrain.steps=0"])
    run_dir = warmup_indexer(cfg)
    assert not (run_dir / "dense").exists() and has_indexer(run_dir / "dsa")
    cfg = load_warmup_config(None, overrides + [f"model.checkpoint={run['dir'] / 'dsa'}", "pretrain.steps=0"])
    with pytest.raises(ConfigError, match="already has indexer tensors"):
        warmup_indexer(cfg)
