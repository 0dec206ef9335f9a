"""`keel specialists`: one GRPO run per domain, all from one base checkpoint, then a cross-domain table.

Each specialist is an ordinary `keel train` run (rl/loop/driver.py) whose `model.checkpoint` is the base and whose
`sft.steps` is 0, so GRPO starts from the base itself; its data, rewards and hyper-parameters are the recipe's
shared `train` section with the domain's own `train` section on top. An agent domain (`agent: true`, `task` an
environment kind: search, planner, codefix or mixed) trains on tool-use episodes (`agent.enabled`); it keeps its
own `sft.steps`, a warm start on the scripted oracle's episodes, because the base has never seen the tool layout.

Recipe directory:
  recipe.yaml                  the resolved recipe
  state.json                   the base model and each specialist's keel run directory (rewritten atomically)
  base/                        the base SFT run (mixture.parquet, init/model), unless base.checkpoint is given
  configs/<domain>.yaml        the keel train config of each specialist, before the recipe's fixed keys
  specialists/<domain>-<stamp>/ each specialist's keel run directory (checkpoints, metrics, summary.json)
  summary.json                 reward and held-out accuracy of the base and every specialist on every domain

The recipe's schema and the per-domain configs: rl/recipes/specialists_config.py.

Resume (`keel specialists --resume DIR`): the base SFT is skipped when its model exists, a specialist whose run
has a summary.json is not retrained, and an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rl.loop.config import ConfigError
from rl.loop.data import is_dataset_file, load_dataset
from rl.loop.held_out import held_out_split
from rl.loop.run_dir import create_run_dir, resume_run_dir, write_atomic
from rl.recipes.specialists_config import (
    base_config,
    domain_config,
    enabled_domains,
    load_specialists_config,
)

# ---- recipe state -------------------------------------------------------------------------------


def read_state(recipe_dir: Path) -> dict:
    path = recipe_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"base": None, "specialists": {}}


def write_state(recipe_dir: Path, state: dict) -> None:
    """Atomic: a crash leaves the old state or the new one, never half of one."""
    write_atomic(recipe_dir / "state.json", json.dumps(state, indent=1))


def run_finished(run_dir: str | Path | None) -> bool:
    """A keel run is finished once its summary.json exists (the driver writes it after the last evaluation)."""
    return run_dir is not None and (Path(run_dir) / "summary.json").exists()


def final_model(run_dir: str | Path) -> Path:
    """The model a finished keel run ends with: its newest checkpoint, or init/ when it ran no RL step."""
    from rl.loop.driver import latest_run_checkpoint

    ckpt = latest_run_checkpoint(Path(run_dir))
    return ckpt / "model" if ckpt else Path(run_dir) / "init" / "model"


def prepare_recipe_dir(recipe: DictConfig, resume: str | None) -> tuple[DictConfig, Path]:
    """A new recipe directory (recipe.yaml written), or the one being resumed (its recipe.yaml read back)."""
    if resume:
        recipe_dir = resume_run_dir(resume, "recipe.yaml", "keel specialists")
        return load_specialists_config(recipe_dir / "recipe.yaml"), recipe_dir
    return recipe, create_run_dir(recipe.run.output_dir, recipe.run.name, recipe, "recipe.yaml")


# ---- evaluation (shared with rl/recipes/distill.py) -----------------------------------------------------


def evaluate_domain(run, client) -> dict[str, float]:
    """Greedy decoding on the domain's held-out set: mean reward and accuracy (every reward earned in full)."""
    metrics = run.evaluate(client)
    return {"reward": metrics["eval/reward"], "accuracy": metrics["eval/accuracy"]}


def evaluate_models(models: dict[str, Path], domains: dict[str, DictConfig], work_dir: Path) -> dict:
    """{model: {domain: {"reward", "accuracy"}}} for every model on every domain's held-out set.

    One rollout engine serves them all: it starts on the first model and loads each next model's weights the way
    it loads the trainer's during RL, from the checkpoint's own file (an engine start costs far more than that).
    """
    from rl.loop.driver import Run
    from rollout.client import RolloutClient

    runs = {name: Run(cfg, work_dir) for name, cfg in domains.items()}
    engine = max((cfg.rollout.engine for cfg in domains.values()), key=lambda e: e.max_model_len)
    first = next(iter(models.values()))
    client = RolloutClient(str(first), 1, OmegaConf.to_container(engine))
    table: dict = {}
    try:
        bar = tqdm(total=len(models) * len(runs), desc="evaluate", unit="eval")
        for version, (model, path) in enumerate(models.items()):
            if version:
                client.load_checkpoint(path, version=version)
            for domain, run in runs.items():
                table.setdefault(model, {})[domain] = evaluate_domain(run, client)
                bar.update()
        bar.close()
    finally:
        client.shutdown()
    return table


def print_table(title: str, table: dict, extra: dict[str, dict[str, str]] | None = None) -> None:
    """Rows = models, columns = reward and accuracy per domain (+ optional extra columns per model)."""
    from rich.console import Console
    from rich.table import Table

    domains = list(next(iter(table.values())))
    extra = extra or {}
    extra_cols = list(dict.fromkeys(k for row in extra.values() for k in row))
    out = Table(title=title)
    out.add_column("model", no_wrap=True)
    for d in domains:
        out.add_column(f"{d} reward", justify="right")
        out.add_column(f"{d} acc", justify="right")
    for c in extra_cols:
        out.add_column(c, justify="right")
    for model, row in table.items():
        cells = [f"{row[d][k]:.3f}" for d in domains for k in ("reward", "accuracy")]
        out.add_row(model, *cells, *[extra.get(model, {}).get(c, "") for c in extra_cols])
    Console().print(out)


# ---- the recipe ---------------------------------------------------------------------------------


def write_mixture(recipe: DictConfig, domains: dict[str, DictConfig], path: Path) -> Path:
    """The base SFT data: base.rows_per_domain training rows of each mixture domain, as prompt/answer/domain.

    Drawn from the domain's training split, the one its specialist trains on: the base never sees a held-out
    prompt, so every model of the table is evaluated on prompts it has not trained on."""
    tables = []
    for name in recipe.base.mixture:
        d = domains[name].data
        t, _ = held_out_split(d.task, d.eval_task, recipe.base.rows_per_domain, d.eval_size, d.seed, d.eval_seed,
                              lambda task, n, seed, d=d: load_dataset(task, n, seed, d.max_operand),
                              generated=lambda task: not is_dataset_file(task))
        t = t.slice(0, recipe.base.rows_per_domain)
        tables.append(pa.table({"prompt": t.column("prompt"), "answer": t.column("answer").cast(pa.string()),
                                "domain": [name] * t.num_rows}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.concat_tables(tables), tmp)
    os.replace(tmp, path)
    return path


def build_base(recipe: DictConfig, recipe_dir: Path, domains: dict[str, DictConfig]) -> Path:
    """The base checkpoint: base.checkpoint as given, or an SFT of the preset model on the domain mixture."""
    if recipe.base.checkpoint:
        return Path(recipe.base.checkpoint)
    from rl.loop.driver import Run

    base_dir = recipe_dir / "base"
    mixture = write_mixture(recipe, domains, base_dir / "mixture.parquet")
    cfg = base_config(recipe, mixture, recipe_dir / "configs")
    if cfg.sft.steps <= 0:
        raise ConfigError(f"{recipe_dir / 'configs' / 'base.yaml'}: sft.steps must be > 0 to train a base "
                          "(or give base.checkpoint)")
    run = Run(cfg, base_dir)
    print(f"keel: base: SFT of the {cfg.model.preset} preset on {list(recipe.base.mixture)} "
          f"({cfg.sft.steps} steps) -> {base_dir / 'init' / 'model'}")
    return run.warm_start(run.base_checkpoint())


def specialist_config(recipe: DictConfig, domain: DictConfig, recipe_dir: Path, base: Path | str) -> DictConfig:
    """A domain's keel train config with the recipe's fixed keys: start from the base, no SFT, run dir here."""
    fixed = [f"run.output_dir={recipe_dir / 'specialists'}", f"run.name={domain.name}"]
    if not domain.agent:
        fixed.append("sft.steps=0")
    if base:  # "" before the base exists: the config is only read for its data settings
        fixed.append(f"model.checkpoint={base}")
    if recipe.run.ray_address:
        fixed.append(f"run.ray_address={recipe.run.ray_address}")
    return domain_config(recipe, domain, recipe_dir / "configs", fixed)


def preflight(recipe: DictConfig) -> dict[str, DictConfig]:
    """Every enabled domain's keel config and datasets, built before anything trains, so a bad key, a missing
    data file or a prompt the tokenizer cannot encode fails now rather than after the first specialists."""
    from rl.loop.driver import Run

    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in enabled_domains(recipe):
            # Before the base exists its config names no checkpoint: the preset base has the character tokenizer.
            cfg = specialist_config(recipe, d, Path(tmp), recipe.base.checkpoint or "")
            try:
                Run(cfg, Path(tmp))
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"domain {d.name!r} (task {d.task!r}): {err}") from None
            configs[d.name] = cfg
    return configs


def run_specialists(recipe: DictConfig | None, resume: str | None = None) -> Path:
    """Train the base (if needed) and every enabled specialist, evaluate all of them on every domain; returns
    the recipe directory. With `resume`, finished work in that directory is kept."""
    from rl.loop.driver import ray_session

    if recipe is None and resume is None:
        raise ValueError("give a specialists recipe or a recipe directory to resume")
    recipe, recipe_dir = prepare_recipe_dir(recipe, resume)
    checked = preflight(recipe)
    print(f"keel: specialists recipe directory {recipe_dir}")
    with ray_session(recipe.run.ray_address, cpus_needed=max(map(driver_cpus, checked.values()))):
        state = read_state(recipe_dir)
        base = build_base(recipe, recipe_dir, checked)
        state["base"] = str(base)
        write_state(recipe_dir, state)
        configs = {d.name: specialist_config(recipe, d, recipe_dir, base) for d in enabled_domains(recipe)}
        if recipe.run.parallel:
            train_as_ray_jobs(recipe, recipe_dir, state, configs)
        else:
            train_sequentially(recipe_dir, state, configs)
        models = {"base": base, **{n: final_model(state["specialists"][n]["run_dir"]) for n in configs}}
        table = evaluate_models(models, configs, recipe_dir)
    summary = {"base": str(base), "models": {k: str(v) for k, v in models.items()}, "table": table,
               "runs": {n: state["specialists"][n]["run_dir"] for n in configs}}
    (recipe_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table("specialists: greedy held-out reward / accuracy per domain", table, gain_columns(table))
    return recipe_dir


def driver_cpus(cfg: DictConfig) -> int:
    """Logical CPUs a local Ray needs for one keel train run (the same sum rl.loop.driver.train asks for)."""
    return int(cfg.trainer.num_ranks * cfg.trainer.cpus_per_rank + cfg.rollout.num_workers + 2)


def gain_columns(table: dict) -> dict[str, dict[str, str]]:
    """Per specialist row: its own domain's accuracy change over the base ("own domain gain")."""
    return {name: {"own domain gain": f"{table[name][name]['accuracy'] - table['base'][name]['accuracy']:+.3f}"}
            for name in table if name != "base" and name in table["base"]}


def new_run_dir(cfg: DictConfig) -> Path:
    return create_run_dir(cfg.run.output_dir, cfg.run.name, cfg)


def train_sequentially(recipe_dir: Path, state: dict, configs: dict[str, DictConfig]) -> None:
    """One specialist after another in this process (keel's local Ray stays up between them)."""
    from rl.loop.driver import train

    for name, cfg in configs.items():
        entry = state["specialists"].setdefault(name, {"run_dir": None})
        if run_finished(entry["run_dir"]):
            print(f"keel: specialist {name!r}: finished in {entry['run_dir']}, skipped")
            continue
        if entry["run_dir"] is None:
            # The run directory is recorded before training starts, so an interruption resumes this run.
            entry["run_dir"] = str(new_run_dir(cfg))
            write_state(recipe_dir, state)
        task = f"{cfg.agent.environment} environments" if cfg.agent.enabled else cfg.data.task
        print(f"keel: specialist {name!r}: GRPO on {task} in {entry['run_dir']}")
        train(None, resume=entry["run_dir"])


# ---- the cluster path: one Ray job per specialist -------------------------------------------------


def specialist_resources(cfg: DictConfig) -> dict[str, float]:
    """What one specialist holds while it trains: the trainer's placement group (num_ranks bundles), its rollout
    engines (a GPU per tensor-parallel rank on a cluster; none reserved on CPU) and one CPU for its driver."""
    t, r = cfg.trainer, cfg.rollout
    gpus = t.num_ranks * t.gpus_per_rank + (r.num_workers * r.engine.tensor_parallel_size if t.gpus_per_rank else 0)
    return {"CPU": t.num_ranks * t.cpus_per_rank + 1, "GPU": gpus}


def concurrent_slots(needs: list[dict[str, float]], cluster: dict[str, float]) -> int:
    """How many specialists may train at once: the cluster divided by the largest one's needs.

    Capping concurrency (rather than submitting every job and letting Ray queue actors) avoids two half-placed
    specialists each holding the trainer GPUs the other's rollout engines wait for.
    """
    worst = {k: max(n.get(k, 0.0) for n in needs) for k in ("CPU", "GPU")}
    slots = [int(cluster.get(k, 0.0) // v) for k, v in worst.items() if v > 0]
    if not slots or min(slots) < 1:
        raise ConfigError(f"one specialist needs {worst} but the Ray cluster has {cluster}: lower "
                          "trainer.num_ranks / rollout.num_workers or add nodes")
    return min(slots)


def submit_job(client, entrypoint: str, submission_id: str, timeout_s: float = 180.0) -> str:
    """Submit one job; retried while the head's job agent is still starting (a cluster that just came up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, submission_id=submission_id, entrypoint_num_cpus=1)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(5.0)


def train_as_ray_jobs(recipe: DictConfig, recipe_dir: Path, state: dict, configs: dict[str, DictConfig]) -> None:
    """Each unfinished specialist as its own Ray job running `keel train --resume RUN_DIR` (untested: needs a Ray
    cluster with the job server). The recipe directory must be on storage every node mounts at the same path.
    A rerun does not resubmit a specialist whose recorded job is still pending or running: it waits for it."""
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(recipe.run.job_address or None)
    slots = concurrent_slots([specialist_resources(c) for c in configs.values()], ray.cluster_resources())
    active = {JobStatus.PENDING, JobStatus.RUNNING}
    todo = [n for n in configs if not run_finished(state["specialists"].get(n, {}).get("run_dir"))]
    running: dict[str, str] = {}
    for name in list(todo):  # jobs submitted by an earlier, interrupted invocation
        job = state["specialists"].get(name, {}).get("job_id")
        if job and client.get_job_status(job) in active:
            running[name] = job
            todo.remove(name)
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo) - len(running), desc="specialists", unit="run")
    while todo or running:
        while todo and len(running) < slots:
            name = todo.pop(0)
            entry = state["specialists"].setdefault(name, {"run_dir": None})
            entry["run_dir"] = entry["run_dir"] or str(new_run_dir(configs[name]))
            entry["job_id"] = submit_job(client, f"keel train --resume {shlex.quote(entry['run_dir'])}",
                                         f"keel-{name}-{uuid.uuid4().hex[:8]}")
            write_state(recipe_dir, state)
            running[name] = entry["job_id"]
            tqdm.write(f"keel: specialist {name!r}: submitted Ray job {entry['job_id']} ({entry['run_dir']})")
        time.sleep(10)
        for name, job in list(running.items()):
            status = client.get_job_status(job)
            if status in active:
                continue
            del running[name]
            if status != JobStatus.SUCCEEDED or not run_finished(state["specialists"][name]["run_dir"]):
                logs = client.get_job_logs(job)[-2000:]
                raise RuntimeError(f"specialist {name!r}: Ray job {job} ended {status}; the recipe can be resumed "
                                   f"(it continues from the run's last checkpoint). Last log lines:\n{logs}")
            bar.update()
    bar.close()
