"""Per-step metrics: RUN_DIR/metrics.jsonl (the record) and wandb (offline unless the user opts in)."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON line per record; on resume, records after the resumed checkpoint's step are dropped first
    (they belong to steps that will run again)."""

    def __init__(self, run_dir: Path, wandb_mode: str, project: str, run_name: str, config: dict,
                 resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._wandb = None
        mode = os.environ.get("WANDB_MODE", wandb_mode)
        if mode != "disabled":
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
