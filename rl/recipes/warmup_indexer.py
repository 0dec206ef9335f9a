"""`keel warmup-indexer`: turn a dense DeepSeek-V3-style model into a DSA model (DeepSeek-V3.2, section 2.1.1).

Phases, each a DeepSpeed engine over keel's model, each resumable from its last checkpoint:
  pretrain  (tiny demo only) a dense model without an indexer learns the corpus          -> dense/
  dense     a fresh lightning indexer is added and trained alone (backbone frozen) on the KL between
            the head-summed main attention and softmax of its scores, over all causal tokens -> warmup/
  sparse    top-k attention on; the backbone trains on the LM loss and the indexer on its own KL
            restricted to the selected tokens (the model detaches the indexer's input)    -> dsa/
Then the held-out LM loss of the dense model against the DSA model at each evaluation length.

Nothing is downloaded: the corpus is generated (`copy_corpus`), in the character tokenizer's ids.

Run directory:
  config.yaml                    the resolved configuration
  dense/ warmup/ dsa/            each phase's result (HF format); its config.json present = phase finished
  checkpoints/<phase>/step_N/    model/ (HF), optim/ (DeepSpeed), state.json (written last)
  metrics.jsonl                  one line per step and per evaluation: {"phase", "step", ...}
  summary.json                   the dense vs DSA comparison
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import DeepseekV32Config

from rl.algo.logprobs import token_logprobs
from rl.loop.config import ConfigError, merge_config
from rl.loop.run_dir import commit_checkpoint, create_run_dir, latest_checkpoint, prune_checkpoints, resume_run_dir
from rl.model.checkpoint import build_model, has_indexer, load_config, load_model, save_checkpoint
from rl.model.presets import preset
from rl.model.tokenizer import TOKENIZER_FILE, CharTokenizer
from rl.model.transformer import Transformer

PHASES = ("pretrain", "dense", "sparse")
PHASE_OUTPUT = {"pretrain": "dense", "dense": "warmup", "sparse": "dsa"}

# ---- configuration ------------------------------------------------------------------------------


@dataclass
class RunSection:
    name: str = "warmup-indexer"
    output_dir: str = "runs"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: torch's default (1 avoids oversubscribing a busy CPU)
    checkpoint_every: int = 50  # steps between resumable checkpoints within a phase (0: phase ends only)
    eval_every: int = 50  # steps between held-out evaluations within a phase (0: phase ends only)


@dataclass
class ModelSection:
    checkpoint: str = ""  # dense DeepSeek-V3-style HF checkpoint; "" : pretrain a preset model here
    preset: str = "tiny"  # rl.model.presets name for the pretrained dense model
    overrides: dict[str, Any] = field(default_factory=dict)  # config.json fields over the preset
    seed: int = 0  # initialises the pretrained model and the fresh indexer
    # The indexer added to the dense model; 0 keeps the value in the dense model's config.json.
    index_topk: int = 16
    index_n_heads: int = 0
    index_head_dim: int = 0


@dataclass
class DataSection:
    seq_len: int = 128  # training length (characters after <bos>)
    period: int = 32  # the repeated segment's length: each copied token sits `period` tokens back
    eval_lengths: list[int] = field(default_factory=lambda: [32, 64, 128])  # the table's lengths
    eval_sequences: int = 64
    eval_seed: int = 12345  # held-out sequences; training batches derive from run.seed


@dataclass
class PhaseSection:
    steps: int = 0
    batch_size: int = 8
    lr: float = 1e-3  # the backbone's (pretrain, sparse) or the indexer's (dense)
    indexer_lr: float = 1e-3  # sparse phase: the indexer's own learning rate
    indexer_loss_coef: float = 1.0  # sparse phase: weight of the indexer KL (its gradient is disjoint)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    grad_clip: float = 1.0


@dataclass
class WarmupConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    pretrain: PhaseSection = field(default_factory=lambda: PhaseSection(steps=400, lr=3e-3))
    dense: PhaseSection = field(default_factory=lambda: PhaseSection(steps=200, lr=3e-3))
    sparse: PhaseSection = field(default_factory=lambda: PhaseSection(steps=100, lr=3e-4))
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


def load_warmup_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, validated; an unknown key or bad value names the key."""
    cfg, source = merge_config(WarmupConfig, path, overrides)
    _validate(cfg, source)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _validate(cfg: DictConfig, source: str) -> None:
    problems = []
    if not cfg.model.checkpoint and cfg.pretrain.steps <= 0:
        problems.append("model.checkpoint is empty and pretrain.steps=0: give --checkpoint DIR or pretrain steps")
    if not 1 <= cfg.data.period <= cfg.data.seq_len:
        problems.append(f"data.period={cfg.data.period} must be in [1, data.seq_len={cfg.data.seq_len}]")
    if not cfg.data.eval_lengths or not all(1 <= n <= cfg.data.seq_len for n in cfg.data.eval_lengths):
        problems.append(f"data.eval_lengths={list(cfg.data.eval_lengths)} must be in [1, data.seq_len]")
    if cfg.model.index_topk and cfg.model.index_topk >= cfg.data.seq_len:
        problems.append(
            f"model.index_topk={cfg.model.index_topk} >= data.seq_len={cfg.data.seq_len}: top-k attention would "
            "be dense attention at every length trained"
        )
    for name in PHASES:
        phase = cfg[name]
        if phase.steps < 0 or phase.batch_size < 1:
            problems.append(f"{name}.steps must be >= 0 and {name}.batch_size >= 1")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0..3")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


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


def lm_loss(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of targets [B, T] given final hidden states [B, T, D]."""
    logp, _ = token_logprobs(hidden, model.lm_head.weight, targets)
    return -logp.mean()


@torch.no_grad()
def held_out_loss(model: Transformer, ids: torch.Tensor, sparse: bool, batch_size: int = 16) -> float:
    """Mean held-out LM loss (nats per token) of `model` on ids [N, T + 1], with or without top-k attention."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        out = model(chunk[:, :-1], sparse=sparse)
        total += lm_loss(model, out.hidden, chunk[:, 1:]).item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    return total / count


def add_fresh_indexer(dense: Transformer, config: DeepseekV32Config, seed: int) -> Transformer:
    """A DSA model holding the dense model's weights and a freshly initialised lightning indexer."""
    model = build_model(config, seed=seed, with_indexer=True)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    stray = [name for name in missing if ".indexer." not in name]
    if stray or unexpected:
        raise ValueError(f"dense weights do not fit the DSA model: missing {stray[:5]}, unexpected {unexpected[:5]}")
    return model


# ---- DeepSpeed --------------------------------------------------------------------------------------


def _init_distributed() -> None:
    """One in-process rank unless a launcher set RANK/WORLD_SIZE; gloo on CPU, NCCL on GPU."""
    import deepspeed

    if not os.environ.get("MASTER_PORT"):
        with socket.socket() as s:  # a free port for the single-process group
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def make_engine(model: Transformer, groups: list[dict], batch_size: int, ds: DictConfig):
    """A DeepSpeed engine over `model` whose AdamW updates only the parameters in `groups`."""
    import deepspeed

    _init_distributed()
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_size * int(os.environ["WORLD_SIZE"]),
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


# ---- the run ------------------------------------------------------------------------------------------


class WarmupRun:
    """One warm-up run on disk: its configuration, corpus, phases and metrics."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.dir = cfg, run_dir
        self.tokenizer = self._tokenizer()
        self.held_out = copy_corpus(
            cfg.data.eval_sequences, cfg.data.seq_len, cfg.data.period, cfg.data.eval_seed, self.tokenizer
        )
        self.metrics_path = run_dir / "metrics.jsonl"

    def _tokenizer(self) -> CharTokenizer:
        source = Path(self.cfg.model.checkpoint) if self.cfg.model.checkpoint else None
        if source is not None and (source / TOKENIZER_FILE).exists():
            return CharTokenizer.load(source)
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
        for key in ("index_topk", "index_n_heads", "index_head_dim"):
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

    # ---- metrics

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"phase": phase, "step": step, **metrics}) + "\n")

    def _trim_metrics(self, phase: str, start: int) -> None:
        """Before (re)starting `phase` at `start`: drop its records after `start` and all of later phases."""
        if not self.metrics_path.exists():
            return
        limit = (PHASES.index(phase), start if start else -1)
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            record = json.loads(line)
            if (PHASES.index(record["phase"]), record["step"]) <= limit:
                kept.append(line + "\n")
        self.metrics_path.write_text("".join(kept))

    # ---- checkpoints

    def latest_checkpoint(self, phase: str) -> Path | None:
        """The newest checkpoint of `phase` whose state.json exists (it is written last)."""
        return latest_checkpoint(self.dir / "checkpoints" / phase, "state.json")

    def save_phase_checkpoint(self, phase: str, engine, step: int) -> Path:
        path = self.dir / "checkpoints" / phase / f"step_{step}"
        save_checkpoint(engine.module, path / "model", tokenizer=self.tokenizer)
        engine.save_checkpoint(str(path / "optim"), tag="state")
        commit_checkpoint(path, {"phase": phase, "step": step}, "state.json")
        # Only the newest checkpoint of a phase is needed to resume it.
        prune_checkpoints(self.dir / "checkpoints" / phase, "state.json", keep=1)
        return path

    # ---- one phase

    def train_phase(
        self,
        phase: str,
        model: Transformer,
        groups: list[dict],
        loss_fn: Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
        evaluate: Callable[[Transformer], dict[str, float]],
    ) -> Transformer:
        """Train `model` for the phase's steps (resuming from its last checkpoint) and save its result.

        loss_fn(engine, ids) -> (loss to minimise, metrics); evaluate(model) -> held-out metrics.
        """
        p = self.cfg[phase]
        ckpt = self.latest_checkpoint(phase)
        engine = make_engine(model, groups, p.batch_size, self.cfg.deepspeed)
        start = 0
        if ckpt is not None:  # weights and optimiser state; model/ beside it is the same weights in HF format
            engine.load_checkpoint(str(ckpt / "optim"), tag="state", load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            start = json.loads((ckpt / "state.json").read_text())["step"]
            print(f"keel: {phase}: resumed from {ckpt} at step {start}")
        self._trim_metrics(phase, start)
        if start == 0:
            self.log(phase, 0, evaluate(model))
        base_lrs = [g["lr"] for g in groups]
        run = self.cfg.run
        bar = tqdm(range(start, p.steps), desc=phase, unit="step", initial=start, total=p.steps)
        for step in bar:
            for group, base in zip(engine.optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr_at(step, base, p.warmup_steps, p.steps, p.min_lr_ratio)
            ids = copy_corpus(p.batch_size, self.cfg.data.seq_len, self.cfg.data.period,
                              batch_seed(run.seed, phase, step), self.tokenizer)
            engine.train()
            loss, metrics = loss_fn(engine, ids)
            engine.backward(loss)
            engine.step()
            done = step + 1
            if (run.eval_every and done % run.eval_every == 0) or done == p.steps:
                metrics.update(evaluate(model))
            self.log(phase, done, metrics)
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if not k.startswith("eval/")}, refresh=False)
            if run.checkpoint_every and done % run.checkpoint_every == 0 and done < p.steps:
                self.save_phase_checkpoint(phase, engine, done)
        bar.close()
        save_checkpoint(model, self.dir / PHASE_OUTPUT[phase], tokenizer=self.tokenizer)
        shutil.rmtree(self.dir / "checkpoints" / phase, ignore_errors=True)
        return model

    def finished(self, phase: str) -> bool:
        return (self.dir / PHASE_OUTPUT[phase] / "config.json").exists()

    def eval_ids(self, n: int | None = None) -> torch.Tensor:
        return self.held_out if n is None else self.held_out[:n]

    # ---- the phases

    def pretrain(self) -> None:
        """A dense model (no indexer) learns the corpus: the demo's stand-in for a DeepSeek-V3 checkpoint."""
        model = build_model(self.dense_config(), seed=self.cfg.model.seed, with_indexer=False)
        groups = [{"params": list(model.parameters()), "lr": self.cfg.pretrain.lr, "weight_decay": 0.0}]

        def loss_fn(engine, ids):
            loss = lm_loss(model, engine(ids[:, :-1], sparse=False).hidden, ids[:, 1:])
            return loss, {"lm_loss": loss.item()}

        def evaluate(m):
            return {"eval/dense_lm_loss": held_out_loss(m, self.eval_ids(16), sparse=False)}

        self.train_phase("pretrain", model, groups, loss_fn, evaluate)

    def dense_warmup(self) -> None:
        """Only the fresh indexer trains, on the dense KL; the LM loss is reported (the backbone cannot move)."""
        model = add_fresh_indexer(self.load_dense(), self.dsa_config(), self.cfg.model.seed)
        for p in model.backbone_parameters():
            p.requires_grad_(False)
        groups = [{"params": model.indexer_parameters(), "lr": self.cfg.dense.lr, "weight_decay": 0.0}]

        def loss_fn(engine, ids):
            out = engine(ids[:, :-1], sparse=False, indexer_loss=True)
            with torch.no_grad():
                lm = lm_loss(model, out.hidden, ids[:, 1:])
            return out.indexer_loss, {"indexer_kl": out.indexer_loss.item(), "lm_loss": lm.item()}

        self.train_phase("dense", model, groups, loss_fn, self._evaluate_sparse)

    def sparse_stage(self) -> None:
        """Top-k attention on: LM loss on the backbone, the sparse KL on the indexer (disjoint gradients)."""
        model = load_model(self.dir / "warmup")
        c = self.cfg.sparse
        # One AdamW with two groups is two optimisers: the model detaches the indexer's input, so the LM loss
        # reaches only backbone parameters and the KL only indexer parameters.
        groups = [
            {"params": model.backbone_parameters(), "lr": c.lr, "weight_decay": 0.0},
            {"params": model.indexer_parameters(), "lr": c.indexer_lr, "weight_decay": 0.0},
        ]

        def loss_fn(engine, ids):
            out = engine(ids[:, :-1], sparse=True, indexer_loss=True)
            lm = lm_loss(model, out.hidden, ids[:, 1:])
            loss = lm + c.indexer_loss_coef * out.indexer_loss
            return loss, {"indexer_kl": out.indexer_loss.item(), "lm_loss": lm.item()}

        self.train_phase("sparse", model, groups, loss_fn, self._evaluate_sparse)

    def _evaluate_sparse(self, model: Transformer) -> dict[str, float]:
        """The held-out LM loss with top-k attention at the training length: what the indexer's choices cost."""
        return {"eval/sparse_lm_loss": held_out_loss(model, self.eval_ids(16), sparse=True)}

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


def warmup_indexer(cfg: DictConfig | None, resume: str | None = None, stop_after: str | None = None) -> Path:
    """Run (or resume) the recipe; returns the run directory. Finished phases are not redone.

    stop_after: "pretrain" or "dense" ends the run once that phase is finished (to run the phases as separate
    jobs); `--resume` continues with the rest.
    """
    if stop_after not in (None, "pretrain", "dense"):
        raise ValueError(f"stop_after={stop_after!r}: choose pretrain or dense")
    cfg, run_dir = prepare_run_dir(cfg, resume)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    run = WarmupRun(cfg, run_dir)
    print(f"keel: run directory {run_dir}")
    for phase, step in (("pretrain", run.pretrain), ("dense", run.dense_warmup), ("sparse", run.sparse_stage)):
        if phase == "pretrain" and cfg.model.checkpoint:
            continue
        if not run.finished(phase):
            step()
        if stop_after == phase:
            print(f"keel: stopped after the {phase} phase; continue with --resume {run_dir}")
            return run_dir
    summary = run.compare()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"keel: DSA checkpoint {run_dir / 'dsa'}, metrics {run.metrics_path}")
    return run_dir
