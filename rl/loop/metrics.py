"""Per-step metrics: RUN_DIR/metrics.jsonl (the record) and wandb (offline unless the user opts in).

Every run kind logs through `MetricsLogger`: `keel train` with wandb, the indexer warm-up without (its steps
restart at 0 in each phase, which wandb's step axis cannot show).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def trim_metrics(run_dir: Path, keep: Callable[[dict], bool]) -> None:
    """Keep only the records of RUN_DIR/metrics.jsonl for which `keep(record)` is true (before a resumed run
    repeats the steps after its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Appends one JSON line per record; on resume, records after the resumed checkpoint's step are dropped first
    (they belong to steps that will run again). wandb_mode None: the JSON lines only (WANDB_MODE is not read)."""

    def __init__(self, run_dir: Path, wandb_mode: str | None, project: str, run_name: str, config: dict,
                 resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            trim_metrics(run_dir, lambda record: record.get("step", -1) <= resume_step)
        self._wandb = None
        mode = None if wandb_mode is None else os.environ.get("WANDB_MODE", wandb_mode)
        if mode not in (None, "disabled"):
            import wandb

            run_id_file = run_dir / "wandb_id"
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else secrets.token_hex(4)
            run_id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
                config=config, settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
