"""A run directory's life, for every kind of run (train, specialists, distill, warmup-indexer).

- `create_run_dir`: a new, unique `<output_dir>/<name>-<YYYYmmdd-HHMMSS>[-N]` with the resolved config
  written into it (two runs started in the same second get different directories).
- `resume_run_dir`: an existing one, checked to be a run directory of the expected kind.
- Checkpoints are `<parent>/step_N/` directories completed by a marker file written last and atomically
  (`commit_checkpoint`); `latest_checkpoint` only ever returns completed ones, so a run killed while saving
  resumes from the one before. `prune_checkpoints` keeps the newest few.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def write_atomic(path: Path, text: str) -> None:
    """The whole text or the old file: a crash mid-write leaves only a .tmp beside it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def create_run_dir(output_dir: str | Path, name: str, cfg: DictConfig, config_file: str = "config.yaml") -> Path:
    stem = Path(output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = stem, 0
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:  # another run started in the same second
            n += 1
            run_dir = stem.with_name(f"{stem.name}-{n}")
    write_atomic(run_dir / config_file, OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def resume_run_dir(path: str | Path, config_file: str = "config.yaml", kind: str = "keel run") -> Path:
    run_dir = Path(path)
    if not (run_dir / config_file).exists():
        raise FileNotFoundError(f"--resume {run_dir}: no {config_file} there; is it a {kind} directory?")
    return run_dir


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def completed_checkpoints(parent: Path, marker: str) -> list[Path]:
    """`parent/step_N` directories whose marker file exists, oldest first."""
    return sorted((p for p in parent.glob("step_*") if (p / marker).exists()), key=checkpoint_step)


def latest_checkpoint(parent: Path, marker: str) -> Path | None:
    done = completed_checkpoints(parent, marker)
    return done[-1] if done else None


def commit_checkpoint(path: Path, state: dict, marker: str) -> None:
    """Mark a checkpoint whose other files are written as complete (the marker holds `state`)."""
    write_atomic(path / marker, json.dumps(state, indent=1))


def prune_checkpoints(parent: Path, marker: str, keep: int) -> None:
    """Remove all but the newest `keep` completed checkpoints (keep <= 0: remove none)."""
    done = completed_checkpoints(parent, marker)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
