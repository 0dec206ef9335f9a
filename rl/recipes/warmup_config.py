"""`keel warmup-indexer`'s recipe: its schema (one section per phase) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rl.loop.config import load_checked

PHASES = ("pretrain", "dense", "sparse")


@dataclass
class RunSection:
    name: str = "warmup-indexer"
    output_dir: str = "runs"
    seed: int = 0
    # torch threads of the trainer rank (its Ray CPUs) and of this process; 0: every core of this host (1 avoids
    # oversubscribing a busy CPU)
    threads: int = 0
    ray_address: str = ""  # "" : RAY_ADDRESS or a local Ray started (and stopped) by keel
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
    return load_checked(WarmupConfig, path, overrides, _problems)


def _problems(cfg: DictConfig) -> list[str]:
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
    if cfg.deepspeed.zero_stage not in (0, 1, 2):
        # As for keel train: the absorbed MLA, the indexer and the chunked log-probs read weights outside their
        # modules' forward, which ZeRO-3's partitioned parameters do not allow.
        problems.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0, 1 or 2")
    return problems
