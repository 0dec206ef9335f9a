"""`keel eval` and `keel generate`: any checkpoint on the real rollout engine, with its own tokenizer.

`keel eval CONFIG --checkpoint DIR [--checkpoint DIR2 ...]` samples the config's held-out set (data.eval_task, or
the training set when there is none) with each checkpoint, greedy (top-1) or `--samples K` times per prompt at the
config's rollout sampling, scores every sample with the config's rewards (per data source with
rewards_by_source) and prints one table: mean reward, pass@k (the unbiased estimator of Chen et al. 2021 from n
samples with c correct, 1 - C(n-c, k) / C(n, k), for k = 1, 2, 4, ... n), response length, the fraction cut at
rollout.max_tokens. A sample is correct when it earns every reward in full, as `eval/accuracy` in training. The
samples go to samples.parquet and the table to eval.json in the output directory. Checkpoints after the first
are loaded into the running engine when they have its shapes (one engine start for a before/after comparison).

`keel generate --checkpoint DIR "prompt" ...` prints what a checkpoint answers, in the chat format when its
tokenizer has one (its chat template, or the DeepSeek-V3.2 encoding).

Everything that can be wrong with the checkpoint, its tokenizer, the data or the chat template is found before
the engine starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from rl.loop.config import ConfigError, DataConfig, as_dataclass
from rl.loop.formats import PromptFormat, supports_chat
from rl.loop.run_dir import create_run_dir
from rl.model.checkpoint import CheckpointError, load_config, load_tokenizer
from rl.model.hub import resolve_checkpoint
from rl.model.tokenizer import TOKENIZER_FILES, Tokenizer


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks if ks[-1] == n else [*ks, n]


def summarize(samples: list[dict], n: int) -> dict[str, float]:
    """One table row from the samples of some prompts (n each): reward, pass@k, length, truncation."""
    by_prompt: dict[int, list[bool]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s["correct"])
    row = {"prompts": float(len(by_prompt)), "samples": float(len(samples)),
           "reward": sum(s["reward"] for s in samples) / len(samples)}
    for k in pass_ks(n):
        row[f"pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in by_prompt.values()) / len(by_prompt)
    row["response_tokens"] = sum(s["response_tokens"] for s in samples) / len(samples)
    row["truncated"] = sum(s["finish_reason"] == "length" for s in samples) / len(samples)
    return row


def checkpoint_tokenizer(checkpoint: str | Path, what: str = "--checkpoint") -> tuple[Path, Tokenizer]:
    """A checkpoint directory (or cached hub id) and its tokenizer, checked against its vocab_size."""
    directory = resolve_checkpoint(checkpoint, what)
    tokenizer = load_tokenizer(directory, load_config(directory).vocab_size)
    if tokenizer is None:
        raise FileNotFoundError(f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return directory, tokenizer


def evaluate_checkpoints(cfg: DictConfig, checkpoints: list[str], samples: int = 1, greedy: bool = False,
                         out: str | None = None, limit: int = 0) -> tuple[list[dict], Path]:
    """Evaluate each checkpoint on the config's held-out set; returns the table rows and the output directory."""
    from rl.loop.driver import Run, ray_session
    from rollout.client import RolloutClient

    if cfg.agent.enabled:
        raise ConfigError("keel eval scores prompt datasets; for an agent config use keel eval-agent")
    if not checkpoints:
        raise ConfigError("keel eval: give at least one --checkpoint")
    if samples < 1:
        raise ConfigError(f"--samples {samples}: must be >= 1")
    dirs = [checkpoint_tokenizer(c) for c in checkpoints]
    for _, tokenizer in dirs[1:]:
        if not tokenizer.same_as(dirs[0][1]):
            raise CheckpointError(f"{tokenizer.vocab_file}: a different tokenizer from {dirs[0][1].vocab_file}'s; "
                                  "evaluate these checkpoints in separate runs")
    # The data, the format and the token budget are checked here, before any engine starts.
    probe = Run(cfg, Path(out or cfg.run.output_dir), checkpoint=dirs[0][0])
    out_dir = Path(out) if out else create_run_dir(cfg.run.output_dir, f"eval-{cfg.run.name}", cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = probe.task
    prompts = task.eval_prompts[:limit] if limit else task.eval_prompts
    rows = task.eval_set.slice(0, len(prompts)).to_pylist()
    n = 1 if greedy else samples
    sampling = {**probe.sampling(0, greedy=greedy), "n": n}

    records: list[dict] = []
    table: list[dict] = []
    with ray_session(cfg.run.ray_address, cfg.rollout.num_workers + 2):
        client = RolloutClient(str(dirs[0][0]), cfg.rollout.num_workers, probe.engine_config())
        try:
            for version, (label, (directory, _)) in enumerate(zip(short_labels(checkpoints), dirs, strict=True)):
                if version:
                    client = _serve(client, directory, version, cfg, probe)
                batch = client.generate(prompts, sampling, policy_version=version)
                index = batch.column("prompt_index").to_pylist()
                batch_rows = [rows[i] for i in index]
                scores, reasons, texts = task.score(batch, batch_rows)
                mine = []
                for j, (row, response_ids) in enumerate(zip(batch_rows, batch.column("response_ids").to_pylist(),
                                                             strict=True)):
                    mine.append({
                        "checkpoint": label, "prompt_index": index[j],
                        "sample_index": batch.column("sample_index")[j].as_py(),
                        "data_source": row.get("data_source") or "", "prompt": task.format.prompt_text(row),
                        "answer": row["answer"], "response": texts[j], "reward": float(scores[j]),
                        "correct": bool(scores[j] >= task.full_reward - 1e-6), "reason": reasons[j],
                        "finish_reason": batch.column("finish_reason")[j].as_py(),
                        "response_tokens": len(response_ids), "prompt_ids": batch.column("prompt_ids")[j].as_py(),
                        "response_ids": response_ids,
                    })
                records += mine
                table += _rows(label, mine, n)
        finally:
            client.shutdown()
    pq.write_table(pa.Table.from_pylist(records), out_dir / "samples.parquet")
    summary = {"checkpoints": checkpoints, "greedy": greedy, "samples_per_prompt": n,
               "dataset": cfg.data.eval_task or cfg.data.task, "table": table}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=1))
    return table, out_dir


def short_labels(checkpoints: list[str]) -> list[str]:
    """The checkpoints' shortest distinct path tails, at least two parts ("init/model", "step_40/model")."""
    parts = [Path(c).parts for c in checkpoints]
    for k in range(2, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(checkpoints)


def _rows(label: str, samples: list[dict], n: int) -> list[dict]:
    """The checkpoint's row over all samples, then one per data source when there are several."""
    rows = [{"checkpoint": label, "source": "all", **summarize(samples, n)}]
    sources = sorted({s["data_source"] for s in samples})
    if len(sources) > 1:
        for source in sources:
            rows.append({"checkpoint": label, "source": source or "(none)",
                         **summarize([s for s in samples if s["data_source"] == source], n)})
    return rows


def _serve(client, directory: Path, version: int, cfg: DictConfig, probe):
    """The engine serving `directory`: its weights loaded in place when it has the served model's shapes and one
    model.safetensors, else a fresh engine."""
    from rollout.client import RolloutClient

    try:
        client.load_checkpoint(directory, version=version)
        return client
    except ValueError:  # other shapes, or a sharded checkpoint
        client.shutdown()
        return RolloutClient(str(directory), cfg.rollout.num_workers, probe.engine_config())


def print_table(table: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    ks = [c for c in table[0] if c.startswith("pass@")]
    out = Table(title=title)
    for column in ("checkpoint", "source", "prompts", "reward", *ks, "tokens", "truncated"):
        out.add_column(column, justify="left" if column in ("checkpoint", "source") else "right",
                       overflow="fold")
    for row in table:
        out.add_row(row["checkpoint"], row["source"], f"{row['prompts']:.0f}", f"{row['reward']:.3f}",
                    *[f"{row[k]:.3f}" for k in ks], f"{row['response_tokens']:.1f}", f"{row['truncated']:.3f}")
    import shutil

    Console(width=max(shutil.get_terminal_size().columns, 120)).print(out)  # a pipe gets the whole table too


def generate(cfg: DictConfig, checkpoint: str, prompts: list[str], fmt: str = "auto", system: str = "",
             samples: int = 1, greedy: bool = False, max_tokens: int = 0) -> list[tuple[str, list[str]]]:
    """(the prompt as the model sees it, its responses) for each prompt, from one engine on `checkpoint`."""
    from rl.loop.driver import ray_session
    from rollout.client import RolloutClient
    from rollout.config import EngineConfig

    if fmt not in ("auto", "chat", "raw"):
        raise ConfigError(f"--format {fmt!r}: choose auto, chat or raw")
    directory, tokenizer = checkpoint_tokenizer(checkpoint)
    d = as_dataclass(DataConfig, cfg.data)
    chat = fmt == "chat" or (fmt == "auto" and supports_chat(tokenizer))
    form = PromptFormat(tokenizer, "chat" if chat else "raw", system or d.system_prompt, d.thinking,
                        d.chat_encoding)
    rows = [{"prompt": p} for p in prompts]
    ids = [form.prompt_ids(r) for r in rows]
    r = cfg.rollout
    max_tokens = max_tokens or r.max_tokens
    engine = EngineConfig.of(OmegaConf.to_container(r.engine))
    longest = max(len(p) for p in ids)
    if longest + max_tokens > engine.max_model_len:
        raise ConfigError(f"the longest prompt is {longest} tokens; with {max_tokens} new tokens that exceeds "
                          f"rollout.engine.max_model_len={engine.max_model_len}")
    sampling = {"n": 1 if greedy else samples, "temperature": 1.0 if greedy else r.temperature,
                "top_k": 1 if greedy else r.top_k, "top_p": 1.0 if greedy else r.top_p, "max_tokens": max_tokens,
                "stop_token_ids": list(tokenizer.stop_ids), "seed": cfg.run.seed}
    with ray_session(cfg.run.ray_address, r.num_workers + 2):
        client = RolloutClient(str(directory), 1, engine)
        try:
            batch = client.generate(ids, sampling, policy_version=0)
        finally:
            client.shutdown()
    out = [(form.prompt_text(row), []) for row in rows]
    for i, response in zip(batch.column("prompt_index").to_pylist(), batch.column("response_ids").to_pylist(),
                           strict=True):
        out[i][1].append(tokenizer.decode(response, skip_special_tokens=False))
    return out
