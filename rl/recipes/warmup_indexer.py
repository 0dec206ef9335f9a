"""`keel warmup-indexer`: turn a dense DeepSeek-V3-style model into a DSA model (DeepSeek-V3.2, section 2.1.1).

Phases, each trained by keel's trainer group (trainer/: DeepSpeed ranks in Ray actors, the same as every other
run, with the loss kinds of `trainer.objective.LOSSES`), each resumable from its last checkpoint:
  pretrain  (tiny demo only) a dense model without an indexer learns the corpus          -> dense/
  dense     a fresh lightning indexer is added and trained alone (backbone frozen) on the KL between
            the head-summed main attention and softmax of its scores, over all causal tokens -> warmup/
  sparse    top-k attention on; the backbone trains on the LM loss and the indexer on its own KL
            restricted to the selected tokens (the model detaches the indexer's input)    -> dsa/
Then the held-out LM loss of the dense model against the DSA model at each evaluation length.

The recipe's schema and checks: rl/recipes/warmup_config.py. Nothing is downloaded: the corpus is generated
(`copy_corpus`), in the character tokenizer's ids.

Run directory:
  config.yaml                    the resolved configuration
  dense/ warmup/ dsa/            each phase's result (HF format); its config.json present = phase finished
  checkpoints/<phase>/init/      the model a phase starts from when it is built here (pretrain, dense)
  checkpoints/<phase>/step_N/    model/ (HF), optim/ (DeepSpeed), state.json (written last)
  metrics.jsonl                  one line per step and per evaluation: {"phase", "step", ...}
  summary.json                   the dense vs DSA comparison
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import DeepseekV32Config

from rl.algo.config import GRPOConfig
from rl.loop.config import ConfigError
from rl.loop.metrics import MetricsLogger, trim_metrics
from rl.loop.run_dir import commit_checkpoint, create_run_dir, latest_checkpoint, prune_checkpoints, resume_run_dir
from rl.model.checkpoint import INDEXER_FIELDS, build_model, has_indexer, load_config, load_model, save_checkpoint
from rl.model.presets import preset
from rl.model.tokenizer import CharTokenizer, Tokenizer, has_tokenizer
from rl.model.transformer import Transformer
from rl.recipes.warmup_config import PHASES, load_warmup_config
from trainer.config import TrainerConfig
from trainer.objective import held_out_loss

PHASE_OUTPUT = {"pretrain": "dense", "dense": "warmup", "sparse": "dsa"}
PHASE_LOSS = {"pretrain": "lm", "dense": "indexer_dense", "sparse": "lm_sparse_indexer"}  # trainer.objective.LOSSES

# ---- data and the math (pure functions) -----------------------------------------------------------


def copy_corpus(n: int, seq_len: int, period: int, seed: int, tokenizer: CharTokenizer) -> torch.Tensor:
    """[n, seq_len + 1] token ids: <bos>, then a random lowercase string of `period` characters repeated.

    Every character after the first `period` is a copy of the one `period` tokens back, so predicting it needs
    one specific far-back token: a top-k selection that holds that token loses nothing against dense attention,
    one that misses it can do no better than chance (log 26 nats). The first period is unpredictable for both.
    """
    gen = torch.Generator().manual_seed(seed)
    letters = torch.tensor(tokenizer.encode(string.ascii_lowercase, bos=False))
    segment = letters[torch.randint(len(letters), (n, period), generator=gen)]
    text = segment.repeat(1, -(-seq_len // period))[:, :seq_len]
    return torch.cat([torch.full((n, 1), tokenizer.bos_id), text], dim=1)


def batch_seed(seed: int, phase: str, step: int) -> int:
    """A distinct, reproducible seed per (run seed, phase, step): a resumed phase sees the same batches."""
    return (seed * len(PHASES) + PHASES.index(phase)) * 1_000_003 + step


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to base * min_ratio at step total - 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - 1 - warmup, 1)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def attended_fraction(seq_len: int, topk: int) -> float:
    """Fraction of the causal (query, key) pairs top-k attention computes: sum_t min(k, t+1) / sum_t (t+1)."""
    t = torch.arange(1, seq_len + 1, dtype=torch.float64)
    return float(t.clamp(max=topk).sum() / t.sum())


def add_fresh_indexer(dense: Transformer, config: DeepseekV32Config, seed: int) -> Transformer:
    """A DSA model holding the dense model's weights and a freshly initialised lightning indexer."""
    model = build_model(config, seed=seed, with_indexer=True)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    stray = [name for name in missing if ".indexer." not in name]
    if stray or unexpected:
        raise ValueError(f"dense weights do not fit the DSA model: missing {stray[:5]}, unexpected {unexpected[:5]}")
    return model


# ---- the run ------------------------------------------------------------------------------------------


class WarmupRun:
    """One warm-up run on disk: its configuration, corpus, phases and metrics."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.dir = cfg, run_dir
        self.tokenizer = self._tokenizer()
        self.held_out = copy_corpus(
            cfg.data.eval_sequences, cfg.data.seq_len, cfg.data.period, cfg.data.eval_seed, self.tokenizer
        )
        self.metrics = MetricsLogger(run_dir, None, "keel", run_dir.name, {})
        self.metrics_path = self.metrics.path

    def _tokenizer(self) -> Tokenizer:
        source = Path(self.cfg.model.checkpoint) if self.cfg.model.checkpoint else None
        if source is not None and has_tokenizer(source):
            return Tokenizer.load(source)
        return CharTokenizer()

    # ---- models

    def dense_dir(self) -> Path:
        return Path(self.cfg.model.checkpoint) if self.cfg.model.checkpoint else self.dir / "dense"

    def dense_config(self) -> DeepseekV32Config:
        if self.cfg.model.checkpoint:
            return load_config(self.cfg.model.checkpoint)
        fields = preset(self.cfg.model.preset, **OmegaConf.to_container(self.cfg.model.overrides))
        fields["vocab_size"] = max(fields["vocab_size"], self.tokenizer.vocab_size)
        return DeepseekV32Config(**fields)

    def dsa_config(self) -> DeepseekV32Config:
        """The dense config with the indexer's fields set (index_topk, index_n_heads, index_head_dim)."""
        fields = load_config(self.dense_dir()).to_dict()
        for key in INDEXER_FIELDS:
            if self.cfg.model[key]:
                fields[key] = self.cfg.model[key]
        config = DeepseekV32Config(**{k: v for k, v in fields.items() if k in DeepseekV32Config.__dataclass_fields__})
        if config.index_topk >= self.cfg.data.seq_len:
            raise ConfigError(
                f"index_topk={config.index_topk} >= data.seq_len={self.cfg.data.seq_len}: set model.index_topk"
            )
        return config

    def load_dense(self) -> Transformer:
        directory = self.dense_dir()
        if has_indexer(directory):
            raise ConfigError(f"{directory} already has indexer tensors: it is a DSA checkpoint, not a dense one")
        model = load_model(directory)
        if model.config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"{directory}: vocab_size {model.config.vocab_size} < the corpus tokenizer's")
        return model

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.metrics.log(step, {"phase": phase, **metrics})

    # ---- checkpoints

    def latest_checkpoint(self, phase: str) -> Path | None:
        """The newest checkpoint of `phase` whose state.json exists (it is written last)."""
        return latest_checkpoint(self.dir / "checkpoints" / phase, "state.json")

    def save_phase_checkpoint(self, phase: str, group, step: int) -> Path:
        """model/ + optim/ of the trainer group, then state.json; only the newest one of a phase is kept."""
        path = self.dir / "checkpoints" / phase / f"step_{step}"
        group.save(str(path), tokenizer_dir=str(self.phase_start(phase)))
        commit_checkpoint(path, {"phase": phase, "step": step}, "state.json")
        prune_checkpoints(self.dir / "checkpoints" / phase, "state.json", keep=1)
        return path

    # ---- one phase

    def phase_start(self, phase: str) -> Path:
        """The checkpoint a phase starts from: its init/ (built here) or, for the sparse stage, warmup/."""
        return self.dir / "warmup" if phase == "sparse" else self.dir / "checkpoints" / phase / "init"

    def phase_trainer(self, phase: str, policy: Path):
        """A trainer group on `policy` whose optimiser trains what the phase trains, and the base learning rate of
        each of its parameter groups (backbone, then indexer)."""
        from trainer.group import TrainerGroup

        p, run = self.cfg[phase], self.cfg.run
        options = GRPOConfig(weight_decay=0.0, grad_clip=self.cfg.deepspeed.grad_clip, mini_batch_size=p.batch_size,
                             train_indexer=phase != "pretrain", indexer_lr=p.lr if phase == "dense" else p.indexer_lr,
                             indexer_loss_coef=p.indexer_loss_coef)
        trainer = TrainerConfig(num_ranks=1, zero_stage=self.cfg.deepspeed.zero_stage, dtype="float32",
                                cpus_per_rank=float(rank_threads(run.threads)),
                                gpus_per_rank=1.0 if torch.cuda.is_available() else 0.0)
        base_lrs = {"pretrain": [p.lr], "dense": [p.lr], "sparse": [p.lr, p.indexer_lr]}[phase]
        group = TrainerGroup(str(policy), None, options, trainer, p.lr, run.seed, freeze_backbone=phase == "dense")
        return group, base_lrs

    def train_phase(self, phase: str) -> None:
        """Train the phase's steps from its start checkpoint (or resume from its last checkpoint), then export
        its result to PHASE_OUTPUT[phase] and drop its checkpoints."""
        p, run = self.cfg[phase], self.cfg.run
        ckpt = self.latest_checkpoint(phase)
        group, base_lrs = self.phase_trainer(phase, ckpt / "model" if ckpt else self.phase_start(phase))
        try:
            start = 0
            if ckpt is not None:  # the weights came from model/; the optimiser state from optim/
                group.load_optimizer(str(ckpt))
                start = json.loads((ckpt / "state.json").read_text())["step"]
                print(f"keel: {phase}: resumed from {ckpt} at step {start}")
            limit = (PHASES.index(phase), start if start else -1)
            trim_metrics(self.dir, lambda r: (PHASES.index(r["phase"]), r["step"]) <= limit)
            if start == 0:
                self.log(phase, 0, self.evaluate(phase, group))
            bar = tqdm(range(start, p.steps), desc=phase, unit="step", initial=start, total=p.steps)
            for step in bar:
                ids = copy_corpus(p.batch_size, self.cfg.data.seq_len, self.cfg.data.period,
                                  batch_seed(run.seed, phase, step), self.tokenizer)
                lrs = [lr_at(step, base, p.warmup_steps, p.steps, p.min_lr_ratio) for base in base_lrs]
                targets = ids[:, 1:]
                metrics = group.train_step(ids[:, :-1], targets, torch.ones(targets.shape), lrs, PHASE_LOSS[phase])
                done = step + 1
                if (run.eval_every and done % run.eval_every == 0) or done == p.steps:
                    metrics.update(self.evaluate(phase, group))
                self.log(phase, done, metrics)
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if not k.startswith("eval/")}, refresh=False)
                if run.checkpoint_every and done % run.checkpoint_every == 0 and done < p.steps:
                    self.save_phase_checkpoint(phase, group, done)
            bar.close()
            group.export(str(self.dir / PHASE_OUTPUT[phase]), tokenizer_dir=str(self.phase_start(phase)))
        finally:
            group.shutdown()
        shutil.rmtree(self.dir / "checkpoints" / phase, ignore_errors=True)

    def evaluate(self, phase: str, group) -> dict[str, float]:
        """Held-out LM loss of the phase's model: dense for the pretrained model, with top-k attention at the
        training length once it has an indexer (what the indexer's choices cost)."""
        sparse = phase != "pretrain"
        key = "eval/sparse_lm_loss" if sparse else "eval/dense_lm_loss"
        return {key: group.eval_loss(self.eval_ids(16), sparse=sparse)}

    def finished(self, phase: str) -> bool:
        return (self.dir / PHASE_OUTPUT[phase] / "config.json").exists()

    def eval_ids(self, n: int | None = None) -> torch.Tensor:
        return self.held_out if n is None else self.held_out[:n]

    # ---- the phases

    def pretrain(self) -> None:
        """A dense model (no indexer) learns the corpus: the demo's stand-in for a DeepSeek-V3 checkpoint."""
        if self.latest_checkpoint("pretrain") is None:
            model = build_model(self.dense_config(), seed=self.cfg.model.seed, with_indexer=False)
            save_checkpoint(model, self.phase_start("pretrain"), tokenizer=self.tokenizer)
        self.train_phase("pretrain")

    def dense_warmup(self) -> None:
        """Only the fresh indexer trains, on the dense KL; the LM loss is reported (the backbone cannot move)."""
        if self.latest_checkpoint("dense") is None:
            model = add_fresh_indexer(self.load_dense(), self.dsa_config(), self.cfg.model.seed)
            save_checkpoint(model, self.phase_start("dense"), tokenizer=self.tokenizer)
        self.train_phase("dense")

    def sparse_stage(self) -> None:
        """Top-k attention on: LM loss on the backbone, the sparse KL on the indexer (disjoint gradients: the model
        detaches the indexer's input, so one AdamW with two groups is two optimisers)."""
        self.train_phase("sparse")

    # ---- the comparison

    def compare(self) -> dict:
        """Held-out LM loss at every evaluation length of: the dense model; the DSA model after the sparse stage;
        under top-k attention, the same backbone after the dense warm-up alone (the indexer's choices are the only
        difference from dense) and with a fresh, untrained indexer (what the warm-up is for)."""
        dense, dsa = self.load_dense(), load_model(self.dir / "dsa")
        warm = load_model(self.dir / "warmup")
        fresh = add_fresh_indexer(dense, dsa.config, self.cfg.model.seed)
        topk = dsa.config.index_topk
        rows = []
        for length in sorted(self.cfg.data.eval_lengths):
            ids = self.held_out[:, : length + 1]
            rows.append(
                {
                    "length": length,
                    "dense_loss": held_out_loss(dense, ids, sparse=False),
                    "dsa_loss": held_out_loss(dsa, ids, sparse=True),
                    "warmup_only_loss": held_out_loss(warm, ids, sparse=True),
                    "fresh_indexer_loss": held_out_loss(fresh, ids, sparse=True),
                    "topk_over_length": min(topk, length) / length,
                    "attended_fraction": attended_fraction(length, topk),
                }
            )
        for row in rows:
            row["ratio"] = row["dsa_loss"] / row["dense_loss"]
        longest = rows[-1]
        return {
            "index_topk": topk,
            "rows": rows,
            "longest_length": longest["length"],
            "within_5_percent": longest["ratio"] <= 1.05,
            "attends_at_most_a_quarter": longest["attended_fraction"] <= 0.25,
        }


def format_table(summary: dict) -> str:
    """The dense vs DSA comparison as a small fixed-width table."""
    head = (f"{'length':>6} {'dense':>8} {'dsa':>8} {'dsa/dense':>9} {'stage 1':>8} {'fresh idx':>9} {'k/len':>6} "
            f"{'attended':>8}")
    lines = [f"held-out LM loss (nats/token), index_topk={summary['index_topk']}", head]
    for r in summary["rows"]:
        lines.append(
            f"{r['length']:>6} {r['dense_loss']:>8.4f} {r['dsa_loss']:>8.4f} {r['ratio']:>9.4f} "
            f"{r['warmup_only_loss']:>8.4f} {r['fresh_indexer_loss']:>9.4f} {r['topk_over_length']:>6.3f} "
            f"{r['attended_fraction']:>8.3f}"
        )
    lines.append("dsa: after both stages (top-k attention); stage 1: the dense backbone with the warmed-up indexer, "
                 "top-k attention; fresh idx: the same with an untrained indexer")
    lines.append("k/len: index_topk / length; attended: fraction of causal (query, key) pairs top-k attention computes")
    return "\n".join(lines)


def prepare_run_dir(cfg: DictConfig | None, resume: str | None) -> tuple[DictConfig, Path]:
    """A new run directory with config.yaml written, or the one being resumed with its config.yaml read back."""
    if resume:
        run_dir = resume_run_dir(resume, kind="keel warmup-indexer")
        return load_warmup_config(run_dir / "config.yaml"), run_dir
    return cfg, create_run_dir(cfg.run.output_dir, cfg.run.name, cfg)


def rank_threads(threads: int) -> int:
    """run.threads resolved: the given count, or every core of this host for 0."""
    return threads or os.cpu_count() or 1


def warmup_indexer(cfg: DictConfig | None, resume: str | None = None, stop_after: str | None = None) -> Path:
    """Run (or resume) the recipe; returns the run directory. Finished phases are not redone.

    stop_after: "pretrain" or "dense" ends the run once that phase is finished (to run the phases as separate
    jobs); `--resume` continues with the rest.
    """
    from rl.loop.driver import ray_session

    if stop_after not in (None, "pretrain", "dense"):
        raise ValueError(f"stop_after={stop_after!r}: choose pretrain or dense")
    cfg, run_dir = prepare_run_dir(cfg, resume)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)  # this process's evaluation of the finished models (`compare`)
    torch.manual_seed(cfg.run.seed)
    run = WarmupRun(cfg, run_dir)
    print(f"keel: run directory {run_dir}")
    phases = [("pretrain", run.pretrain), ("dense", run.dense_warmup), ("sparse", run.sparse_stage)]
    if cfg.model.checkpoint:
        phases = phases[1:]
    try:
        with ray_session(cfg.run.ray_address, cpus_needed=rank_threads(cfg.run.threads) + 1):
            for phase, train in phases:
                if not run.finished(phase):
                    train()
                if stop_after == phase:
                    print(f"keel: stopped after the {phase} phase; continue with --resume {run_dir}")
                    return run_dir
        summary = run.compare()
    finally:
        run.metrics.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"keel: DSA checkpoint {run_dir / 'dsa'}, metrics {run.metrics_path}")
    return run_dir
