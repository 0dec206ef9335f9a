"""`keel specialists`' recipe: its schema, its checks, and the `keel train` config it derives for each domain
(the recipe's shared `train` section, the domain's own on top, the recipe's fixed keys last)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rl.loop.config import RewardConfig, load_checked, load_config
from rollout.agent.environments import ENVIRONMENTS


@dataclass
class RecipeRunSection:
    name: str = "specialists"
    output_dir: str = "runs"
    ray_address: str = ""  # "" : RAY_ADDRESS or a local Ray started (and stopped) by keel
    # false: specialists one after another in this process (a laptop). true: each specialist as its own Ray job
    # (`keel train --resume RUN_DIR`) submitted to a cluster, as many at once as the cluster's resources hold.
    parallel: bool = False
    job_address: str = ""  # parallel: the Ray dashboard address for job submission ("" : RAY_ADDRESS)


@dataclass
class BaseSection:
    checkpoint: str = ""  # an existing base model (HF dir with its tokenizer); "" : SFT one on the mixture
    mixture: list[str] = field(default_factory=list)  # domain names whose training tasks the base SFT mixes
    rows_per_domain: int = 2000
    train: dict[str, Any] = field(default_factory=dict)  # keel train keys for the base SFT (sft.steps, model...)


@dataclass
class DomainSection:
    name: str = ""
    task: str = ""  # data.task: a generated task (addition, sort, arithmetic, logic) or a .parquet/.jsonl file;
    # for an agent domain, the environment kind (agent.environment: search | planner | codefix | mixed)
    enabled: bool = True
    agent: bool = False  # a multi-turn tool-use domain: episodes in synthesized environments, no `rewards`
    rewards: list[RewardConfig] = field(default_factory=list)  # empty: the shared `train.rewards`
    train: dict[str, Any] = field(default_factory=dict)  # keel train keys over the shared `train` section


@dataclass
class SpecialistsConfig:
    run: RecipeRunSection = field(default_factory=RecipeRunSection)
    train: dict[str, Any] = field(default_factory=dict)  # keel train keys every specialist starts from
    base: BaseSection = field(default_factory=BaseSection)
    domains: list[DomainSection] = field(default_factory=list)


def load_specialists_config(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, validated; an unknown key or bad value names the key."""
    return load_checked(SpecialistsConfig, path, overrides, _problems)


def _problems(cfg: DictConfig) -> list[str]:
    problems = []
    names = [d.name for d in cfg.domains]
    if not enabled_domains(cfg):
        problems.append("domains: enable at least one domain")
    if any(not n for n in names) or len(set(names)) != len(names):
        problems.append(f"domains: every domain needs a unique, non-empty name (have {names})")
    for i, d in enumerate(cfg.domains):
        if not d.task:
            problems.append(f"domains[{i}] ({d.name}): task is empty")
        if d.agent and d.task != "mixed" and d.task not in ENVIRONMENTS:
            problems.append(f"domains[{i}] ({d.name}): an agent domain's task is an environment kind "
                            f"(mixed or one of {sorted(ENVIRONMENTS)}), not {d.task!r}")
    if not cfg.base.checkpoint:
        agents = [d.name for d in cfg.domains if d.agent and d.name in cfg.base.mixture]
        if agents:
            problems.append(f"base.mixture: {agents} are agent domains, which have no prompts to mix; their "
                            "specialists warm-start on oracle episodes instead (the domain's sft.steps)")
        unknown = [n for n in cfg.base.mixture if n not in names]
        if not cfg.base.mixture or unknown:
            problems.append(f"base.mixture={list(cfg.base.mixture)}: name domains to SFT the base on "
                            f"(unknown: {unknown}), or set base.checkpoint")
    return problems


def enabled_domains(recipe: DictConfig) -> list[DictConfig]:
    return [d for d in recipe.domains if d.enabled]


def domain_config(recipe: DictConfig, domain: DictConfig, directory: Path, fixed: list[str]) -> DictConfig:
    """The keel train config of one domain: shared `train` <- the domain's `train`, task and rewards <- `fixed`.

    The merged YAML is written to directory/<domain>.yaml first, so keel's own loader validates it and its
    errors name that file.
    """
    task = {"agent": {"enabled": True, "environment": domain.task}} if domain.agent else {"data": {"task": domain.task}}
    layers = [recipe.train, domain.train, task]
    if domain.rewards and not domain.agent:
        layers.append({"rewards": domain.rewards})  # a list in a merge replaces the shared one
    merged = OmegaConf.merge(*(OmegaConf.to_container(OmegaConf.create(x)) for x in layers))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{domain.name}.yaml"
    path.write_text(OmegaConf.to_yaml(merged))
    return load_config(path, fixed)


def base_config(recipe: DictConfig, mixture: Path, directory: Path) -> DictConfig:
    """The keel config of the base SFT: shared `train` <- `base.train`, data = the written mixture."""
    merged = OmegaConf.merge(*(OmegaConf.to_container(x) for x in (recipe.train, recipe.base.train)))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "base.yaml"
    path.write_text(OmegaConf.to_yaml(merged))
    return load_config(path, [f"data.task={mixture}", f"data.eval_task={mixture}"])
