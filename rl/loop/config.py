"""The run configuration: dataclasses as the omegaconf schema, YAML recipes and dot-list overrides on top.

`load_config("configs/quickstart.yaml", ["grpo.kl_coef=0.01"])` merges the YAML and the overrides into the
schema; an unknown key or a value of the wrong type is an error that names the key and the file.
"""

from __future__ import annotations

from collections.abc import Callable
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
    # HF-format directory to start from instead of a fresh preset model, or a Hugging Face hub id resolved through
    # the local cache (HF_HUB_OFFLINE=1: never downloaded); its own tokenizer is used (tokenizer.json, ...)
    checkpoint: str = ""
    # With a fresh preset model: a tokenizer directory (or hub id) to use instead of the character tokenizer;
    # the preset's vocab_size grows to fit it.
    tokenizer: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # config.json fields over the preset
    seed: int = 0


@dataclass
class DataConfig:
    # a generated task (addition | logic | ...) or a dataset file: .parquet, .jsonl, .json, or a Hugging Face
    # `datasets` save_to_disk directory (rl/loop/data.py)
    task: str = "addition"
    eval_task: str = ""  # held-out set: a path, or "" to generate one from `task` with eval_seed
    train_size: int = 4000
    eval_size: int = 200
    max_operand: int = 99
    seed: int = 0
    eval_seed: int = 12345
    # raw: the prompt text with the tokenizer's special tokens; chat: the tokenizer's chat template with the
    # generation prompt (or the DeepSeek-V3.2 encoding when it has none; rl/loop/formats.py)
    format: str = "raw"
    chat_encoding: str = "auto"  # auto | tokenizer | deepseek_v32
    system_prompt: str = ""  # chat only: a system message before every prompt that has none
    thinking: bool = False  # chat: the thinking generation prompt (DeepSeek-V3.2 <think>; enable_thinking)
    # Dataset columns; a dotted key reads a field of a struct column (e.g. reward_model.ground_truth).
    prompt_key: str = "prompt"
    messages_key: str = "messages"  # chat only: a list of {role, content} ending with the user's message
    answer_key: str = "answer"
    response_key: str = ""  # the SFT warm start's reference responses ("" : the answer)
    source_key: str = ""  # picks a row's rewards from rewards_by_source ("" : data_source, else domain)
    overlong: str = "drop"  # prompts that leave no room for rollout.max_tokens: drop (counted) | error
    # The warm start's teacher is sloppy: this fraction of its demonstrations is the integer answer plus one (drawn
    # per training row with `seed`); the rewards still check the answer. The quickstart's 0.6 leaves what RL can fix.
    sft_off_by_one: float = 0.0


@dataclass
class SFTConfig:
    """Supervised warm start on the task's reference answers before RL (0 steps: skip)."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 10
    # trainer.objective.LOSSES: "lm" (the model's own attention), or "lm_dense_indexer" (dense attention, and the
    # indexer learns the dense attention's choices by its KL: a warm start for RL where sparsity matters)
    loss: str = "lm"


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
    # Faults (rollout/liveness.py): a worker whose process or engine dies, or whose call outlives its deadline
    # (timeout_s + timeout_per_token_s * max_tokens per max_num_seqs requests), is restarted at the current
    # weights and its share re-issued; past max_restarts failures of one worker the run stops, naming it.
    max_restarts: int = 3
    timeout_s: float = 300.0
    timeout_per_token_s: float = 0.5
    # Asynchronous RL (rl/loop/pipeline.py): step t's batch is sampled by the weights of version max(first, t - N)
    # while the trainer updates, N = max_staleness; 0 is the synchronous loop. Rows older than N versions (none
    # by construction; a guard) are dropped or kept by stale_policy.
    max_staleness: int = 0
    stale_policy: str = "drop"  # drop | keep
    # Requests in flight at a weight update (rollout/partial.py): "finish" on the weights they started with, or
    # "partial": batch t generates partial_chunk_tokens tokens per request on v(t), then its unfinished requests
    # are resubmitted from their prefix on v(t + 1), each token tagged with its version (token_versions).
    in_flight: str = "finish"  # finish | partial
    partial_chunk_tokens: int = 4


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
class SandboxConfig:
    """Where model-written code runs (rewards/SECURITY.md). Without user namespaces (and not root) the only
    isolation left is "plain" (the program runs as you, limits only): refused unless allow_weak is true."""

    allow_weak: bool = False


@dataclass
class PlacementConfig:
    """Where the run's actors go on the Ray cluster (rl/loop/placement.py). A resource name pins a group to the
    nodes that declare that custom resource (`ray start --resources='{"keel_trainer": 1}'`); "" lets Ray choose."""

    trainer_resource: str = ""
    rollout_resource: str = ""
    colocate: bool = False  # every rank and engine on one node (one STRICT_PACK placement group)
    trainer_strategy: str = "PACK"  # Ray's placement-group strategy: PACK | SPREAD | STRICT_PACK
    rollout_strategy: str = "PACK"


@dataclass
class KeelConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    # data source (the rows' data_source / domain) -> its rewards; rows of other sources use `rewards`. A source's
    # scores are scaled to the total weight of `rewards`, so accuracy (every reward in full) means one thing.
    rewards_by_source: dict[str, list[RewardConfig]] = field(default_factory=dict)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # enabled: tool-use episodes instead of `data`


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


def load_checked(schema: type, path: str | Path | None, overrides: list[str] | None,
                 problems: Callable[[DictConfig], list[str]]) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, then `problems(cfg)`: every problem it finds goes into one
    ConfigError naming the source. Returns a read-only DictConfig. Every command's config loads this way."""
    cfg, source = merge_config(schema, path, overrides)
    found = problems(cfg)
    if found:
        raise ConfigError(f"{source}: " + "; ".join(found))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The `keel train` config: schema <- YAML file <- dot-list overrides, validated; read-only."""
    return load_checked(KeelConfig, path, overrides, _problems)


def _async_problems(cfg: DictConfig) -> list[str]:
    r = cfg.rollout
    if r.max_staleness < 0:
        return [f"rollout.max_staleness={r.max_staleness} must be >= 0 (0: synchronous)"]
    problems = [] if r.stale_policy in ("drop", "keep") else [
        f"rollout.stale_policy={r.stale_policy!r}: choose drop or keep"]
    if r.max_staleness and cfg.grpo.old_logprobs != "engine":
        problems.append("rollout.max_staleness > 0 needs grpo.old_logprobs=engine: pi_old must be the policy that "
                        "sampled (an older version), not the trainer's current weights")
    if r.in_flight not in ("finish", "partial"):
        problems.append(f"rollout.in_flight={r.in_flight!r}: choose finish or partial")
    elif r.in_flight == "partial":
        if not r.max_staleness:
            problems.append("rollout.in_flight=partial needs rollout.max_staleness >= 1: the synchronous loop has "
                            "no weight update during a rollout")
        if not 1 <= r.partial_chunk_tokens < r.max_tokens:
            problems.append(f"rollout.partial_chunk_tokens={r.partial_chunk_tokens} must be in [1, rollout."
                            f"max_tokens={r.max_tokens}): no request would ever move to the newer version")
        if cfg.agent.enabled:
            problems.append("rollout.in_flight=partial is written for prompt tasks; agent episodes (agent.enabled) "
                            "finish in flight")
    if r.max_staleness and r.engine.sleep_while_training:
        problems.append("rollout.max_staleness > 0 samples while the trainer steps: rollout.engine."
                        "sleep_while_training cannot be on")
    return problems


def _problems(cfg: DictConfig) -> list[str]:
    problems = []
    if cfg.rollout.group_size < 2:
        problems.append("rollout.group_size must be >= 2 (advantages are relative to the group)")
    if cfg.grpo.kl_estimator not in ("unbiased", "k3", "none"):
        problems.append(f"grpo.kl_estimator={cfg.grpo.kl_estimator!r}: choose unbiased, k3 or none")
    if cfg.grpo.old_logprobs not in ("engine", "trainer"):
        problems.append(f"grpo.old_logprobs={cfg.grpo.old_logprobs!r}: choose engine (the sampling engine's log-probs) "
                        "or trainer (the trainer's own at the start of the step)")
    if cfg.grpo.indexer_grad_clip < 0:
        problems.append(f"grpo.indexer_grad_clip={cfg.grpo.indexer_grad_clip} must be >= 0 (0: no clip)")
    if cfg.grpo.keep_indexer_selection and not cfg.rollout.engine.capture_indexer:
        problems.append("grpo.keep_indexer_selection replays the engine's indexer selections: it needs "
                        "rollout.engine.capture_indexer=true (or set grpo.keep_indexer_selection=false)")
    if cfg.sft.loss not in ("lm", "lm_dense_indexer", "lm_sparse_indexer"):
        problems.append(f"sft.loss={cfg.sft.loss!r}: choose lm, lm_dense_indexer or lm_sparse_indexer")
    if not 0 <= cfg.data.sft_off_by_one <= 1:
        problems.append(f"data.sft_off_by_one={cfg.data.sft_off_by_one} must be in [0, 1]")
    if cfg.data.sft_off_by_one and cfg.data.response_key:
        problems.append("data.sft_off_by_one writes the warm start's responses itself: leave data.response_key empty")
    if cfg.rollout.max_restarts < 0:
        problems.append(f"rollout.max_restarts={cfg.rollout.max_restarts} must be >= 0")
    if cfg.rollout.timeout_s <= 0 or cfg.rollout.timeout_per_token_s < 0:
        problems.append(f"rollout.timeout_s={cfg.rollout.timeout_s} must be > 0 and rollout.timeout_per_token_s="
                        f"{cfg.rollout.timeout_per_token_s} >= 0")
    problems += _async_problems(cfg)
    if not 0 < cfg.rollout.top_p <= 1:
        problems.append(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.rollout.temperature <= 0:
        problems.append("rollout.temperature must be > 0 for RL (greedy decoding has no log-probs to learn from)")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if batch % cfg.trainer.num_ranks:
        problems.append(f"prompts_per_step * group_size = {batch} is not divisible by trainer.num_ranks")
    if cfg.trainer.zero_stage not in (0, 1, 2, 3):
        problems.append(f"trainer.zero_stage={cfg.trainer.zero_stage} must be 0, 1, 2 or 3")
    if not cfg.rewards:
        problems.append("rewards: name at least one reward")
    problems += _data_problems(cfg)
    if cfg.run.wandb_mode not in ("offline", "online", "disabled"):
        problems.append(f"run.wandb_mode={cfg.run.wandb_mode!r}: choose offline, online or disabled")
    if cfg.agent.enabled:
        problems += _agent_problems(cfg)
    return problems


def _data_problems(cfg: DictConfig) -> list[str]:
    d, problems = cfg.data, []
    if d.format not in ("raw", "chat"):
        problems.append(f"data.format={d.format!r}: choose raw or chat")
    if d.chat_encoding not in ("auto", "tokenizer", "deepseek_v32"):
        problems.append(f"data.chat_encoding={d.chat_encoding!r}: choose auto, tokenizer or deepseek_v32")
    if d.format == "raw" and d.system_prompt:
        problems.append("data.system_prompt needs data.format=chat")
    if d.overlong not in ("drop", "error"):
        problems.append(f"data.overlong={d.overlong!r}: choose drop or error")
    for key in ("prompt_key", "messages_key", "answer_key"):
        if not d[key]:
            problems.append(f"data.{key} must name a column")
    for source, rewards in cfg.rewards_by_source.items():
        if not rewards:
            problems.append(f"rewards_by_source.{source}: name at least one reward")
        elif sum(r.weight for r in rewards) <= 0:
            problems.append(f"rewards_by_source.{source}: the weights must add up to more than 0")
    if cfg.rewards_by_source and sum(r.weight for r in cfg.rewards) <= 0:
        problems.append("rewards: the weights must add up to more than 0 (rewards_by_source scales to them)")
    if cfg.model.checkpoint and cfg.model.tokenizer:
        problems.append("model.tokenizer is for a fresh preset model; a model.checkpoint brings its own tokenizer")
    return problems


def _agent_problems(cfg: DictConfig) -> list[str]:
    from rollout.agent.context import STRATEGIES
    from rollout.agent.environments import ENVIRONMENTS
    from rollout.agent.schedule import SCHEDULES
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
    if a.schedule not in SCHEDULES:
        problems.append(f"agent.schedule={a.schedule!r}: choose one of {list(SCHEDULES)}")
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


def as_dataclass(schema: type, node: Any) -> Any:
    """A config section as an instance of its dataclass (what crosses Ray), from a typed node or an untyped one
    (a resumed run's config.yaml is read without the schema); keys the section lacks take their defaults."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
