"""The run configuration: dataclasses as the omegaconf schema, YAML recipes and dot-list overrides on top.

`load_config("configs/quickstart.yaml", ["grpo.kl_coef=0.01"])` merges the YAML and the overrides into the
schema; an unknown key or a value of the wrong type is an error that names the key and the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rl.algo.config import GRPOConfig
from rollout.agent.config import AgentConfig
from rollout.config import EngineConfig
from trainer.config import TrainerConfig


@dataclass
class ModelConfig:
    preset: str = "tiny"  # rl.model.presets name, used when `checkpoint` is empty
    checkpoint: str = ""  # HF-format directory to start from instead of a fresh preset model
    overrides: dict[str, Any] = field(default_factory=dict)  # config.json fields over the preset
    seed: int = 0


@dataclass
class DataConfig:
    task: str = "addition"  # a generated task (addition | logic | ...) or a .parquet/.jsonl path
    eval_task: str = ""  # held-out set: a path, or "" to generate one from `task` with eval_seed
    train_size: int = 4000
    eval_size: int = 200
    max_operand: int = 99
    seed: int = 0
    eval_seed: int = 12345


@dataclass
class SFTConfig:
    """Supervised warm start on the task's reference answers before RL (0 steps: skip)."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 10


@dataclass
class RolloutConfig:
    num_workers: int = 1
    prompts_per_step: int = 16
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    top_p: float = 1.0
    max_tokens: int = 8
    logprobs_candidates: int = 0  # 0: enough for the kept set (top_k, or the vocab when top_p < 1)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class RewardConfig:
    name: str = "exact_match"  # registry name or import path "module:function"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    steps: int = 20
    eval_every: int = 0  # 0: evaluate before and after only
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    ray_address: str = ""  # "" : RAY_ADDRESS or a local Ray started (and stopped) by keel
    wandb_mode: str = "offline"  # offline | online | disabled (WANDB_MODE wins when set)
    wandb_project: str = "keel"
    dump_rollouts: bool = True


@dataclass
class KeelConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)  # enabled: tool-use episodes instead of `data`


class ConfigError(ValueError):
    pass


def merge_config(schema: type, path: str | Path | None, overrides: list[str] | None) -> tuple[DictConfig, str]:
    """Structured `schema` <- YAML file <- dot-list overrides; returns the merged config and its source text.

    Every failure is a ConfigError naming the source (file and overrides) and, where omegaconf knows it, the key.
    """
    layers = [OmegaConf.structured(schema)]
    source = "defaults"
    try:
        if path is not None:
            source = str(path)
            if not Path(path).exists():
                raise FileNotFoundError(f"config file {path} does not exist")
            layers.append(OmegaConf.load(path))
        if overrides:
            source = f"{source} + command-line overrides {overrides}"
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.merge(*layers), source
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"{source}: {'key ' + repr(key) + ': ' if key else ''}{first_line}") from None
    except TypeError:  # omegaconf's error for a dot-list that indexes into a list, e.g. domains.0.task=...
        raise ConfigError(f"{source}: a list cannot be changed item by item on the command line; edit the YAML "
                          "or replace the whole list") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, validated; returns a read-only DictConfig."""
    cfg, source = merge_config(KeelConfig, path, overrides)
    _validate(cfg, source)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _validate(cfg: DictConfig, source: str) -> None:
    problems = []
    if cfg.rollout.group_size < 2:
        problems.append("rollout.group_size must be >= 2 (advantages are relative to the group)")
    if cfg.grpo.kl_estimator not in ("unbiased", "k3", "none"):
        problems.append(f"grpo.kl_estimator={cfg.grpo.kl_estimator!r}: choose unbiased, k3 or none")
    if not 0 < cfg.rollout.top_p <= 1:
        problems.append(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.rollout.temperature <= 0:
        problems.append("rollout.temperature must be > 0 for RL (greedy decoding has no log-probs to learn from)")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if batch % cfg.trainer.num_ranks:
        problems.append(f"prompts_per_step * group_size = {batch} is not divisible by trainer.num_ranks")
    if cfg.trainer.zero_stage == 3:
        # The absorbed MLA (W_UK/W_UV), the indexer head weights and the chunked log-probs (lm_head) read
        # weights outside their own modules' forward, which ZeRO-3's partitioned parameters do not allow yet.
        problems.append("trainer.zero_stage=3 is not supported yet; use 1 or 2 (optimizer/gradient sharding)")
    elif cfg.trainer.zero_stage not in (0, 1, 2):
        problems.append(f"trainer.zero_stage={cfg.trainer.zero_stage} must be 0, 1 or 2")
    if not cfg.rewards:
        problems.append("rewards: name at least one reward")
    if cfg.run.wandb_mode not in ("offline", "online", "disabled"):
        problems.append(f"run.wandb_mode={cfg.run.wandb_mode!r}: choose offline, online or disabled")
    if cfg.agent.enabled:
        problems += _agent_problems(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _agent_problems(cfg: DictConfig) -> list[str]:
    from rollout.agent.context import STRATEGIES
    from rollout.agent.environments import ENVIRONMENTS
    from rollout.agent.template import TEMPLATES

    a, problems = cfg.agent, []
    if a.environment != "mixed" and a.environment not in ENVIRONMENTS:
        problems.append(f"agent.environment={a.environment!r}: choose mixed or one of {sorted(ENVIRONMENTS)}")
    if a.difficulty not in (1, 2, 3):
        problems.append(f"agent.difficulty={a.difficulty} must be 1, 2 or 3")
    if a.template not in TEMPLATES:
        problems.append(f"agent.template={a.template!r}: choose one of {sorted(TEMPLATES)}")
    for key in ("context_strategy", "eval_context_strategy"):
        if a[key] not in STRATEGIES:
            problems.append(f"agent.{key}={a[key]!r}: choose one of {list(STRATEGIES)}")
    if a.sft_cut_demos and a.eval_context_strategy not in ("discard_75", "discard_all"):
        problems.append(f"agent.sft_cut_demos needs agent.eval_context_strategy discard_75 or discard_all, got "
                        f"{a.eval_context_strategy!r}")
    if a.max_turns < 1:
        problems.append("agent.max_turns must be >= 1")
    if a.max_total_tokens > cfg.rollout.engine.max_model_len:
        problems.append(f"agent.max_total_tokens={a.max_total_tokens} exceeds rollout.engine.max_model_len="
                        f"{cfg.rollout.engine.max_model_len}: the engine could not hold a full episode")
    if a.max_total_tokens <= cfg.rollout.max_tokens:
        problems.append(f"agent.max_total_tokens={a.max_total_tokens} leaves no room for a prompt before "
                        f"rollout.max_tokens={cfg.rollout.max_tokens} (the budget of one turn)")
    return problems


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
