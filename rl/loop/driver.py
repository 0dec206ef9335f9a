"""`keel train`: supervised warm start, then GRPO steps of rollout -> reward -> update -> weight sync.

The rollouts are answers to `data` prompts scored by `rewards`, or, with `agent.enabled`, multi-turn
tool-use episodes in synthesized environments scored by their verifiers (rl/loop/agent_task.py).

A run directory holds everything needed to inspect and resume a run:
  config.yaml            the resolved configuration
  base/ init/            the starting model and the warm-started one (also the KL reference)
  checkpoints/step_N/    model/ (HF format), optim/ (DeepSpeed), loop_state.json (written last)
  metrics.jsonl          one line per step (+ eval lines); wandb/ mirrors it
  rollouts/step_N.parquet every sampled response with its tokens, log-probs, routing, masks and reward
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rewards.sandbox import ALLOW_WEAK_ENV
from rl.algo.config import GRPOConfig
from rl.loop.config import RolloutConfig, as_dataclass
from rl.loop.data import sample_indices
from rl.loop.metrics import MetricsLogger
from rl.loop.pipeline import LaggedRollouts
from rl.loop.placement import check_placement, cluster_nodes, reserve, where
from rl.loop.reaper import Watcher
from rl.loop.run_dir import commit_checkpoint, create_run_dir, latest_checkpoint, prune_checkpoints, resume_run_dir
from rl.loop.step import async_step, collect, collect_partial, rl_step
from rl.loop.tasks import Task, make_task
from rl.model.checkpoint import (
    CheckpointError,
    build_model,
    load_config,
    load_tokenizer,
    save_checkpoint,
)
from rl.model.hub import resolve_checkpoint
from rl.model.presets import preset
from rl.model.tokenizer import TOKENIZER_FILES, CharTokenizer, Tokenizer
from rollout.config import EngineConfig
from trainer.config import TrainerConfig

LOOP_STATE = "loop_state.json"  # written last into a checkpoint: its presence marks it complete


@contextmanager
def ray_session(address: str, cpus_needed: int):
    """Join RAY_ADDRESS / --ray-address if given; otherwise start a local Ray and stop it afterwards."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        yield
        return
    if address:
        try:
            env = {k: os.environ[k] for k in (ALLOW_WEAK_ENV,) if k in os.environ}
            ray.init(address=address, runtime_env={"env_vars": env} if env else None)
        except ConnectionError as err:
            hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                "; a cluster started with `ray start` uses token authentication when ~/.ray/auth_token exists: "
                "set RAY_AUTH_MODE=token (and the same token file) to join it")
            raise ConnectionError(f"could not join the Ray cluster at {address}: {err}{hint}") from err
    watcher = None
    if not address:
        # Logical CPUs: actors hold theirs for the whole run, reward tasks need a few more to schedule. "local": a
        # Ray of this run's own, even when `ray start` left a cluster on the machine (run.ray_address joins one).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed), include_dashboard=False,
                 log_to_driver=os.environ.get("KEEL_RAY_LOGS", "0") == "1")
        # Stops what Ray leaves of the session if this process is killed (rl/loop/reaper.py).
        watcher = Watcher(ray._private.worker._global_node.get_session_dir_path())
    # After ray.init, whose own SIGTERM handler exits without a word.
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        ray.shutdown()
        if watcher:
            watcher.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum: int, frame) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop): unwind the run as a KeyboardInterrupt naming the signal, so
    the actors and Ray are stopped on the way out. Repeats are ignored: a second Ctrl-C would cut that short and
    leave Ray's processes behind."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


class Run:
    """The state of one training run on disk, and the steps that change it."""

    def __init__(self, cfg: DictConfig, run_dir: Path, checkpoint: str | Path | None = None):
        """`checkpoint`: a model to serve instead of the run's own (keel eval); its tokenizer is the one used."""
        self.cfg, self.dir = cfg, run_dir
        self.tokenizer = self._tokenizer(checkpoint)
        self.task: Task = make_task(cfg, self.tokenizer)
        self.placement = None  # the run's placement groups (rl.loop.placement.Reserved), made by _train

    def _tokenizer(self, checkpoint: str | Path | None) -> Tokenizer:
        """The model's own tokenizer: `checkpoint`'s or model.checkpoint's (every id must fit its vocab_size), the
        run's base/ one on resume, model.tokenizer's for a fresh preset model, or the character tokenizer."""
        source = checkpoint or self.cfg.model.checkpoint
        if source:
            directory = resolve_checkpoint(source, "--checkpoint" if checkpoint else "model.checkpoint")
            tokenizer = load_tokenizer(directory, load_config(directory).vocab_size)
            if tokenizer is None:
                raise FileNotFoundError(f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): put "
                                        "the model's tokenizer files beside its weights")
            return tokenizer
        base = self.dir / "base"
        if (base / "config.json").exists():  # a resumed run: the tokenizer its base model was saved with
            tokenizer = load_tokenizer(base, load_config(base).vocab_size)
            if tokenizer is not None:
                return tokenizer
        if self.cfg.model.get("tokenizer"):
            directory = resolve_checkpoint(self.cfg.model.tokenizer, "model.tokenizer")
            tokenizer = load_tokenizer(directory)
            if tokenizer is None:
                raise FileNotFoundError(f"model.tokenizer: {directory} has no tokenizer (none of "
                                        f"{', '.join(TOKENIZER_FILES)})")
            wanted = self.cfg.model.overrides.get("vocab_size")
            if wanted is not None and wanted < tokenizer.vocab_size:
                raise CheckpointError(f"{tokenizer.vocab_file}: the tokenizer has {tokenizer.vocab_size} token ids, "
                                      f"more than model.overrides.vocab_size={wanted}: ids >= {wanted} would have no "
                                      "embedding row")
            return tokenizer
        return CharTokenizer()

    def engine_config(self) -> EngineConfig:
        return EngineConfig.of(OmegaConf.to_container(self.cfg.rollout.engine))

    # ---- models ----------------------------------------------------------------------------------

    def base_checkpoint(self) -> Path:
        """The starting model: the configured checkpoint, or a fresh preset model saved into the run."""
        if self.cfg.model.checkpoint:
            src = resolve_checkpoint(self.cfg.model.checkpoint)
            load_config(src)  # fail early, naming the file, if it is not a model
            return src
        base = self.dir / "base"
        if not (base / "config.json").exists():
            overrides = OmegaConf.to_container(self.cfg.model.overrides)
            fields = preset(self.cfg.model.preset, **overrides)
            fields["vocab_size"] = max(fields["vocab_size"], self.tokenizer.vocab_size)
            for key, token in (("bos_token_id", self.tokenizer.bos_id), ("eos_token_id", self.tokenizer.eos_id),
                               ("pad_token_id", self.tokenizer.pad_id)):
                if token is not None and key not in overrides:
                    fields[key] = token
            from transformers import DeepseekV32Config

            model = build_model(DeepseekV32Config(**fields), seed=self.cfg.model.seed)
            save_checkpoint(model, base, tokenizer=self.tokenizer)
        return base

    def trainer_group(self, policy: Path, reference: Path | None, lr: float):
        """The trainer ranks on `policy` (and the KL reference), with the run's typed grpo and trainer sections;
        log-probs are taken at the rollout's temperature."""
        from trainer.group import TrainerGroup

        return TrainerGroup(str(policy), str(reference) if reference else None,
                            as_dataclass(GRPOConfig, self.cfg.grpo), as_dataclass(TrainerConfig, self.cfg.trainer),
                            lr, self.cfg.run.seed, temperature=self.cfg.rollout.temperature,
                            placement=self.placement.trainer if self.placement else None)

    def rollout_client(self, policy: Path, r: RolloutConfig, publisher_node: str | None):
        """The rollout workers on `policy`, in the run's placement; says on which nodes they and trainer rank 0
        (on `publisher_node`) run."""
        from rollout.client import RolloutClient

        client = RolloutClient(str(policy), r.num_workers, self.engine_config(), max_restarts=r.max_restarts,
                               timeout_s=r.timeout_s, timeout_per_token_s=r.timeout_per_token_s,
                               placement=self.placement.rollout if self.placement else None)
        print(f"keel: placement: {where(publisher_node, client.worker_nodes)}", flush=True)
        return client

    def warm_start(self, base: Path) -> Path:
        """SFT on the task's answers (sft.steps > 0) into init/; otherwise init/ is the base model."""
        from trainer.group import warmup_lr

        init = self.dir / "init"
        if (init / "model" / "config.json").exists():
            return init / "model"
        sft = self.cfg.sft
        if sft.steps == 0:
            shutil.copytree(base, init / "model", dirs_exist_ok=True)
            return init / "model"
        group = self.trainer_group(base, None, sft.lr)
        bar = tqdm(range(sft.steps), desc="sft", unit="step")
        try:
            for step in bar:
                idx = sample_indices(self.task.num_train, sft.batch_size, self.cfg.run.seed + 1, step)
                m = group.sft_step(*self.task.sft_tensors(idx), lr=warmup_lr(step, sft.lr, sft.warmup_steps),
                                   loss=sft.loss)
                bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
            group.save(str(init), tokenizer_dir=str(base))
        finally:
            group.shutdown()
        return init / "model"

    # ---- rollouts, rewards, evaluation -----------------------------------------------------------

    def sampling(self, step: int, greedy: bool = False) -> dict:
        r = self.cfg.rollout
        return {
            "n": 1 if greedy else r.group_size,
            # Greedy decoding as top-1 sampling: the engine's log-probs and kept sets stay well defined.
            "temperature": 1.0 if greedy else r.temperature,
            "top_k": 1 if greedy else r.top_k,
            "top_p": 1.0 if greedy else r.top_p,
            "max_tokens": r.max_tokens,
            "stop_token_ids": list(self.tokenizer.stop_ids),
            "logprobs_candidates": r.logprobs_candidates or None,  # None: as many as the kept set needs
            # vLLM seeds each request with seed + prompt_index * G + sample: steps must not overlap.
            "seed": (self.cfg.run.seed * 100_003 + step) * 1_000_000,
        }

    def evaluate(self, client) -> dict[str, float]:
        """Held-out greedy evaluation by the task (accuracy, mean reward, and the task's own figures)."""
        return self.task.evaluate(client, self.sampling(0, greedy=True))


def prepare_run_dir(cfg: DictConfig | None, resume: str | None) -> tuple[DictConfig, Path]:
    """A new run directory (config.yaml written), or the one being resumed (its config.yaml read back)."""
    if resume:
        run_dir = resume_run_dir(resume)
        return OmegaConf.load(run_dir / "config.yaml"), run_dir
    return cfg, create_run_dir(cfg.run.output_dir, cfg.run.name, cfg)


def latest_run_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete RL checkpoint of a run (loop_state.json is written last)."""
    return latest_checkpoint(run_dir / "checkpoints", LOOP_STATE)


def train(cfg: DictConfig, resume: str | None = None) -> Path:
    cfg, run_dir = prepare_run_dir(cfg, resume)
    if cfg.get("sandbox", {}).get("allow_weak"):
        # Read by the sandbox in every process that scores code (Ray workers inherit the driver's environment
        # on a local Ray; ray_session passes it on to a joined cluster).
        os.environ[ALLOW_WEAK_ENV] = "1"
    cpus = int(cfg.trainer.num_ranks * cfg.trainer.cpus_per_rank + cfg.rollout.num_workers + 2)
    run = Run(cfg, run_dir)  # the tokenizer, the data and the prompt format are checked before Ray starts
    try:
        with ray_session(cfg.run.ray_address, cpus):
            return _train(cfg, run_dir, run)
    except BaseException as err:
        what = f"interrupted ({err})" if isinstance(err, KeyboardInterrupt) else f"stopped by {type(err).__name__}"
        print(f"keel: {what}; last checkpoint: {latest_run_checkpoint(run_dir) or 'none yet'}; continue with: "
              f"keel train --resume {run_dir}", file=sys.stderr, flush=True)
        raise


def _train(cfg: DictConfig, run_dir: Path, run: Run | None = None) -> Path:
    run = run or Run(cfg, run_dir)
    print(f"keel: run directory {run_dir}")
    # A cluster too small for the plan stops the run here, before any actor starts (rl.loop.placement).
    run.placement = reserve(check_placement(cfg, cluster_nodes()))
    if hasattr(run.task, "check_held_out"):
        run.task.check_held_out()  # an evaluation prompt in the training set stops the run before it starts
    init = run.warm_start(run.base_checkpoint())

    ckpt = latest_run_checkpoint(run_dir)
    state = json.loads((ckpt / "loop_state.json").read_text()) if ckpt else {"step": 0, "eval_before": None}
    policy = ckpt / "model" if ckpt else init
    # Without a checkpoint the run starts over (eval included), so none of an interrupted run's records stay.
    logger = MetricsLogger(run_dir, cfg.run.wandb_mode, cfg.run.wandb_project, run_dir.name,
                           OmegaConf.to_container(cfg), resume_step=state["step"] if ckpt else -1)
    trainer = run.trainer_group(policy, init, cfg.grpo.lr)
    r = as_dataclass(RolloutConfig, cfg.rollout)  # a run from before a key existed gets its default
    client = run.rollout_client(policy, r, trainer.publisher_node)
    client.version = state["step"]  # the engines serve this step's checkpoint
    stop_s = 60.0  # how long the actors get to shut down on their own
    rollouts = None
    try:
        if ckpt:
            trainer.load_optimizer(str(ckpt))
            print(f"keel: resumed from {ckpt} at step {state['step']}")
        if state["eval_before"] is None:
            before = run.evaluate(client)
            state["eval_before"], state["eval_before_metrics"] = before["eval/accuracy"], before
            logger.log(0, before)
        if r.max_staleness:  # asynchronous: batches sampled ahead by older weights (rl/loop/pipeline.py)
            if client.cuda:
                raise NotImplementedError("rollout.max_staleness > 0 with CUDA engines: loading a weight version "
                                          "over NCCL while the trainer steps is not written yet (CPU engines only)")
            partial = r.in_flight == "partial"  # unfinished requests move to the next version mid-batch
            sample = (lambda t, switch: collect_partial(run, client, t, switch)) if partial else (
                lambda t: collect(run, client, t))
            rollouts = LaggedRollouts(state["step"], cfg.run.steps, r.max_staleness, sample, client.load_weights,
                                      partial=partial)
        bar = tqdm(range(state["step"], cfg.run.steps), desc="grpo", unit="step", initial=state["step"],
                   total=cfg.run.steps)
        for step in bar:
            metrics = async_step(run, trainer, client, rollouts, step) if rollouts else rl_step(run, trainer, client,
                                                                                                  step)
            state["step"] = step + 1
            # Workers that loaded this step's weights through the object store: on another node than rank 0.
            metrics["sync/object_store_workers"] = sum(u.get("source") == "object_store" for u in client.last_update)
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < cfg.run.steps:
                with rollouts.paused() if rollouts else nullcontext():
                    metrics.update(run.evaluate(client))
            logger.log(step + 1, metrics)
            if metrics.get("skipped_minibatches"):
                tqdm.write(f"keel: step {step + 1}: skipped {metrics['skipped_minibatches']:.0f} mini-batch(es) "
                           "whose loss was NaN/inf (no optimiser step taken on them)")
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0):.4f}")
            if (step + 1) % cfg.run.checkpoint_every == 0 or step + 1 == cfg.run.steps:
                save_run_checkpoint(run_dir, trainer, state, str(init), cfg.run.keep_checkpoints)
        with rollouts.paused() if rollouts else nullcontext():
            after = run.evaluate(client)
        state["eval_after"], state["eval_after_metrics"] = after["eval/accuracy"], after
        logger.log(cfg.run.steps, after)
        (run_dir / "summary.json").write_text(json.dumps(state, indent=1))
        line = run.task.report(state.get("eval_before_metrics") or {}, after)
        if line:
            print(f"keel: {line}")
        print(
            f"keel: held-out accuracy before RL {state['eval_before']:.3f} -> after RL {state['eval_after']:.3f}\n"
            f"keel: metrics {run_dir / 'metrics.jsonl'}, rollouts {run_dir / 'rollouts'}, "
            f"checkpoints {run_dir / 'checkpoints'}"
        )
    except BaseException:
        stop_s = 5.0  # failed or interrupted: an actor may be stuck mid-call; it is killed
        raise
    finally:
        if rollouts:
            rollouts.close()
        logger.close()
        client.shutdown(timeout_s=stop_s)
        trainer.shutdown(timeout_s=stop_s)
        run.placement.remove()
    return run_dir


def save_run_checkpoint(run_dir: Path, trainer, state: dict, tokenizer_dir: str, keep: int) -> None:
    parent = run_dir / "checkpoints"
    path = parent / f"step_{state['step']}"
    trainer.save(str(path), tokenizer_dir=tokenizer_dir)
    commit_checkpoint(path, state, LOOP_STATE)
    prune_checkpoints(parent, LOOP_STATE, keep)
