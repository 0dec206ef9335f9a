"""`keel distill`: distil the domain specialists of a `keel specialists` recipe into one model.

  sample   each specialist answers its own domain's training prompts (n samples each) on keel's vLLM rollout
           workers; the domain's rewards score every response and those with reward >= sample.min_reward are
           kept, one parquet shard per specialist, each written whole with an atomic rename
  dataset  dataset.parquet: the shards concatenated, with provenance columns
           (prompt, response, specialist, domain, prompt_id, sample, reward)
  sft      one model (by default the specialists' base) fine-tuned on the mixture with DeepSpeed: next-token loss
           on the response tokens and <eos> only, prompts masked, samples packed into shared rows (sft.pack);
           resumable from its last checkpoint
  evaluate the base, every specialist and the distilled model on every domain's held-out set; the table shows
           how much of each specialist's gain on its own domain the distilled model keeps

Run directory:
  config.yaml                   the resolved configuration (the specialists directory resolved to a path)
  shards/<specialist>.parquet   kept samples of one specialist; present = that specialist is sampled
  dataset.parquet               the SFT mixture (rebuilt from the shards, so a resume never duplicates rows)
  sft/step_N/                   model/ (HF), optim/ (DeepSpeed), state.json (written last)
  summary.json                  dataset counts and the evaluation table
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rl.algo.config import GRPOConfig
from rl.loop.config import as_dataclass, load_checked
from rl.loop.run_dir import commit_checkpoint, create_run_dir, latest_checkpoint, prune_checkpoints, resume_run_dir
from rl.recipes.specialists import evaluate_models, print_table

DATASET_COLUMNS = ("prompt", "response", "specialist", "domain", "prompt_id", "sample", "reward")

# ---- configuration ------------------------------------------------------------------------------


@dataclass
class DistillRunSection:
    name: str = "distill"
    output_dir: str = "runs"
    ray_address: str = ""  # "" : RAY_ADDRESS or a local Ray started (and stopped) by keel
    seed: int = 0


@dataclass
class SampleSection:
    prompts_per_domain: int = 512  # the first rows of each domain's training set
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_k: int = 0  # 0: no truncation
    top_p: float = 1.0
    min_reward: float = 1.0  # keep a response when its domain reward >= this (1.0 = verified correct)
    unique: bool = True  # keep one copy of each distinct (prompt, response) of a specialist


@dataclass
class DistillSFTSection:
    init: str = "base"  # the model fine-tuned on the mixture: "base" (the specialists' base) or a checkpoint dir
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10
    checkpoint_every: int = 100  # 0: only at the end
    # Packing: each step's batch_size samples share as few rows as fit, each attending only to itself (the model's
    # segment_ids), so no compute goes to padding; the loss is the same as with right-padded rows.
    pack: bool = True
    # Positions per packed row (a sample of n tokens takes n - 1); a sample longer than an explicit value is an
    # error. 0: four times the dataset's longest sample; when that sample fits in the model's index_topk, at most
    # index_topk (rows within index_topk run dense attention, cheaper than the DSA path on CPU). Attention cost per
    # token grows with the row, so rows of a few samples beat long ones.
    pack_length: int = 0


@dataclass
class DistillConfig:
    run: DistillRunSection = field(default_factory=DistillRunSection)
    specialists: str = ""  # a finished `keel specialists` directory; "" : the newest one under run.output_dir
    sample: SampleSection = field(default_factory=SampleSection)
    sft: DistillSFTSection = field(default_factory=DistillSFTSection)


def load_distill_config(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, validated; an unknown key or bad value names the key."""
    return load_checked(DistillConfig, path, overrides, _problems)


def _problems(cfg: DictConfig) -> list[str]:
    problems = []
    if cfg.sample.prompts_per_domain < 1 or cfg.sample.samples_per_prompt < 1:
        problems.append("sample.prompts_per_domain and sample.samples_per_prompt must be >= 1")
    if cfg.sample.temperature <= 0:
        problems.append("sample.temperature must be > 0")
    if cfg.sft.steps < 1 or cfg.sft.batch_size < 1:
        problems.append("sft.steps and sft.batch_size must be >= 1")
    if cfg.sft.pack_length < 0:
        problems.append("sft.pack_length must be >= 0 (0: chosen from the dataset and the model's index_topk)")
    return problems


# ---- pure helpers -------------------------------------------------------------------------------


def keep_responses(rows: list[dict], min_reward: float, unique: bool) -> list[dict]:
    """The rows whose reward >= min_reward; with `unique`, only the first of each (prompt_id, response)."""
    kept, seen = [], set()
    for row in rows:
        key = (row["prompt_id"], row["response"])
        if row["reward"] < min_reward or (unique and key in seen):
            continue
        seen.add(key)
        kept.append(row)
    return kept


def pack_row_length(pack_length: int, index_topk: int, seqs: list[list[int]]) -> int:
    """sft.pack_length resolved against the dataset (see DistillSFTSection.pack_length); explicit -> checked."""
    longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
    need = len(seqs[longest]) - 1  # the positions a sample takes: its last token is only a target
    if pack_length == 0:
        # Padding waste stays under about a quarter of a row, while attention stays cheap (on the tiny preset,
        # 64 samples of 8-25 tokens train a step in 0.6x the padded time in rows of 64, 1.25x in rows of 512, CPU).
        return max(need, min(4 * need, index_topk)) if need <= index_topk else 4 * need
    if need > pack_length:
        raise ValueError(f"sft.pack_length={pack_length}: dataset row {longest} has {len(seqs[longest])} tokens "
                         f"({need} positions); raise sft.pack_length to at least {need} or set it to 0")
    return pack_length


def kept_gain(base: float, specialist: float, distilled: float) -> float | None:
    """The share of a specialist's gain over the base that the distilled model keeps: (d - b) / (s - b).

    None when the specialist did not improve on the base (there is no gain to keep)."""
    gain = specialist - base
    return (distilled - base) / gain if gain > 0 else None


def kept_gain_columns(table: dict, specialists: list[str]) -> dict[str, dict[str, str]]:
    """For the distilled row: "<domain> kept" = kept_gain of held-out accuracy on each specialist's domain."""
    cells = {}
    for name in specialists:
        k = kept_gain(table["base"][name]["accuracy"], table[name][name]["accuracy"],
                      table["distilled"][name]["accuracy"])
        cells[f"{name} kept"] = "n/a" if k is None else f"{100 * k:.0f}%"
    return {"distilled": cells}


# ---- directories ----------------------------------------------------------------------------------


def newest_specialists_dir(output_dir: str | Path) -> Path:
    """The newest `keel specialists` directory under output_dir that finished (has a summary.json)."""
    done = sorted(p.parent for p in Path(output_dir).glob("*/summary.json") if (p.parent / "recipe.yaml").exists())
    if not done:
        raise FileNotFoundError(f"no finished `keel specialists` directory under {output_dir}; set `specialists:` "
                                "to one (a directory with recipe.yaml and summary.json)")
    return max(done, key=lambda p: (p / "summary.json").stat().st_mtime)


def prepare_distill_dir(cfg: DictConfig, resume: str | None) -> tuple[DictConfig, Path]:
    """A new run directory (config.yaml written, specialists resolved), or the resumed one's config read back."""
    if resume:
        run_dir = resume_run_dir(resume, kind="keel distill")
        return load_distill_config(run_dir / "config.yaml"), run_dir
    source = Path(cfg.specialists) if cfg.specialists else newest_specialists_dir(cfg.run.output_dir)
    if not (source / "summary.json").exists():
        raise FileNotFoundError(f"specialists={source}: no summary.json; finish `keel specialists --resume {source}`")
    cfg = OmegaConf.merge(cfg, {"specialists": str(source.resolve())})
    return cfg, create_run_dir(cfg.run.output_dir, cfg.run.name, cfg)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Whole or absent: a crash mid-write leaves only a .tmp file, which the next attempt overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ---- sample ---------------------------------------------------------------------------------------


def sample_specialist(name: str, run, client, sample: DictConfig) -> pa.Table:
    """One specialist's kept responses on its domain's training prompts (the client holds its weights)."""
    task = run.task
    n = min(sample.prompts_per_domain, len(task.train_prompts))
    sampling = {**run.sampling(0), "n": sample.samples_per_prompt, "temperature": sample.temperature,
                "top_k": sample.top_k, "top_p": sample.top_p}
    batch = client.generate(task.train_prompts[:n], sampling, policy_version=-1)
    prompt_rows = task.train_set.slice(0, n).to_pylist()
    index = batch.column("prompt_index").to_pylist()
    scores, _, responses = task.score(batch, [prompt_rows[i] for i in index])
    rows = [{"prompt": prompt_rows[i]["prompt"], "response": text, "specialist": name, "domain": name,
             "prompt_id": i, "sample": k % sample.samples_per_prompt, "reward": float(score)}
            for k, (i, text, score) in enumerate(zip(index, responses, scores, strict=True))]
    kept = keep_responses(rows, sample.min_reward, sample.unique)
    tqdm.write(f"keel: distill: {name}: kept {len(kept)} of {len(rows)} samples (reward >= {sample.min_reward})")
    schema = pa.schema([("prompt", pa.string()), ("response", pa.string()), ("specialist", pa.string()),
                        ("domain", pa.string()), ("prompt_id", pa.int64()), ("sample", pa.int64()),
                        ("reward", pa.float64())])
    return pa.Table.from_pylist(kept, schema=schema)


def sample_all(cfg: DictConfig, run_dir: Path, models: dict[str, Path], runs: dict) -> None:
    """A shard per specialist not sampled yet; one rollout engine, given each specialist's weights in turn."""
    from rollout.client import RolloutClient

    todo = [n for n in runs if not (run_dir / "shards" / f"{n}.parquet").exists()]
    if not todo:
        return
    engine = max((r.cfg.rollout.engine for r in runs.values()), key=lambda e: e.max_model_len)
    client = RolloutClient(str(models[todo[0]]), 1, OmegaConf.to_container(engine))
    try:
        for version, name in enumerate(tqdm(todo, desc="sample", unit="specialist")):
            if version:
                client.load_checkpoint(models[name], version=version)
            write_parquet_atomic(sample_specialist(name, runs[name], client, cfg.sample),
                                 run_dir / "shards" / f"{name}.parquet")
    finally:
        client.shutdown()


def build_dataset(run_dir: Path, names: list[str]) -> pa.Table:
    """dataset.parquet from the shards, in specialist order: rebuilt whole, so rows are never appended twice."""
    table = pa.concat_tables([pq.read_table(run_dir / "shards" / f"{n}.parquet") for n in names])
    if table.num_rows == 0:
        raise RuntimeError(f"{run_dir}: no sampled response passed the reward filter; lower sample.min_reward or "
                           "sample more (sample.prompts_per_domain, sample.samples_per_prompt)")
    write_parquet_atomic(table, run_dir / "dataset.parquet")
    return table


# ---- fine-tune ------------------------------------------------------------------------------------


def latest_sft_checkpoint(run_dir: Path) -> Path | None:
    return latest_checkpoint(run_dir / "sft", "state.json")


def finetune(cfg: DictConfig, run_dir: Path, dataset: pa.Table, init: Path, keel_cfg: DictConfig) -> Path:
    """SFT of `init` on the dataset with keel's DeepSpeed trainer group; returns the distilled model directory.

    Loss on response tokens (and <eos>) only: `sft_sequences` masks every prompt position. With sft.pack each
    step's samples are packed into rows (`pack_sft_sequences`) and the model gets their segment ids, so a sample
    attends only to itself; otherwise rows are right-padded. The samples of a step are the same either way.
    """
    from rl.loop.data import pack_sft_sequences, pad_sft_sequences, sample_indices, sft_sequences
    from rl.model.checkpoint import load_config
    from rl.model.tokenizer import Tokenizer
    from trainer.config import TrainerConfig
    from trainer.group import TrainerGroup, warmup_lr

    sft = cfg.sft
    ckpt = latest_sft_checkpoint(run_dir)
    start = json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0
    if start >= sft.steps:
        return ckpt / "model"
    group = TrainerGroup(str(ckpt / "model" if ckpt else init), None, as_dataclass(GRPOConfig, keel_cfg.grpo),
                         as_dataclass(TrainerConfig, keel_cfg.trainer), sft.lr, cfg.run.seed)
    tokenizer = Tokenizer.load(init)
    seqs, masks = sft_sequences(dataset.column("prompt").to_pylist(), dataset.column("response").to_pylist(),
                                tokenizer)
    pack_length = pack_row_length(sft.pack_length, load_config(init).index_topk, seqs) if sft.pack else 0
    try:
        if ckpt:
            group.load_optimizer(str(ckpt))
            print(f"keel: distill: SFT resumed from {ckpt} at step {start}")
        bar = tqdm(range(start, sft.steps), desc="distill sft", unit="step", initial=start, total=sft.steps)
        for step in bar:
            idx = sample_indices(len(seqs), sft.batch_size, cfg.run.seed + 2, step)
            batch = [seqs[i] for i in idx], [masks[i] for i in idx]
            lr = warmup_lr(step, sft.lr, sft.warmup_steps)
            if sft.pack:
                # Empty rows pad the row count to a multiple of the ranks, which split rows evenly.
                *tensors, segment_ids = pack_sft_sequences(*batch, pack_length, keel_cfg.trainer.num_ranks)
                m = group.sft_step(*tensors, lr=lr, segment_ids=segment_ids)
            else:
                m = group.sft_step(*pad_sft_sequences(*batch), lr=lr)
            bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
            done = step + 1
            if done == sft.steps or (sft.checkpoint_every and done % sft.checkpoint_every == 0):
                save_sft_checkpoint(run_dir, group, done, str(init))
    finally:
        group.shutdown()
    return latest_sft_checkpoint(run_dir) / "model"


def save_sft_checkpoint(run_dir: Path, group, step: int, tokenizer_dir: str) -> None:
    """model/ + optim/, then state.json last (its presence marks the checkpoint complete); older ones removed."""
    path = run_dir / "sft" / f"step_{step}"
    group.save(str(path), tokenizer_dir=tokenizer_dir)
    commit_checkpoint(path, {"step": step}, "state.json")
    prune_checkpoints(run_dir / "sft", "state.json", keep=1)


# ---- the recipe -------------------------------------------------------------------------------------


def distill(cfg: DictConfig | None, resume: str | None = None, stop_after: str | None = None) -> Path:
    """Sample, filter, fine-tune and evaluate (see the module docstring); returns the run directory.

    stop_after="sample" ends the run once dataset.parquet is written (resume it later to fine-tune)."""
    from rl.loop.driver import Run, ray_session

    if cfg is None and resume is None:
        raise ValueError("give a distill config or a run directory to resume")
    cfg, run_dir = prepare_distill_dir(cfg, resume)
    source = Path(cfg.specialists)
    summary = json.loads((source / "summary.json").read_text())
    # Each domain as its specialist trained on it: data, held-out set, rewards and sampling limits.
    keel_cfgs = {n: OmegaConf.load(Path(run) / "config.yaml") for n, run in summary["runs"].items()}
    agents = [n for n, c in keel_cfgs.items() if c.get("agent", {}).get("enabled")]
    if agents:
        print(f"keel: distill: skipping agent specialist(s) {agents}: distilling multi-turn episodes is not "
              "supported yet (distill samples single-turn answers)")
    keel_cfgs = {n: c for n, c in keel_cfgs.items() if n not in agents}
    if not keel_cfgs:
        raise ValueError(f"specialists={source}: no single-turn specialist to distil")
    names = list(keel_cfgs)
    models = {k: Path(v) for k, v in summary["models"].items()}
    init = models["base"] if cfg.sft.init == "base" else Path(cfg.sft.init)
    print(f"keel: distill run directory {run_dir}; specialists from {source}")
    first = keel_cfgs[names[0]]
    cpus = int(first.trainer.num_ranks * first.trainer.cpus_per_rank + first.rollout.num_workers + 2)
    with ray_session(cfg.run.ray_address, cpus):
        runs = {n: Run(c, run_dir) for n, c in keel_cfgs.items()}
        sample_all(cfg, run_dir, models, runs)
        dataset = build_dataset(run_dir, names)
        if stop_after == "sample":
            return run_dir
        distilled = finetune(cfg, run_dir, dataset, init, first)
        table = evaluate_models({**models, "distilled": distilled}, keel_cfgs, run_dir)
    counts = Counter(dataset.column("specialist").to_pylist())
    result = {"specialists": str(source), "distilled": str(distilled), "dataset_rows": dict(counts), "table": table}
    (run_dir / "summary.json").write_text(json.dumps(result, indent=1))
    print_table("distillation: greedy held-out reward / accuracy per domain", table, kept_gain_columns(table, names))
    return run_dir
