"""The trainer group's resources and precision: the `trainer` section of the run config
(rl.loop.config.KeelConfig), passed as an instance to trainer.group.TrainerGroup and every TrainerWorker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainerConfig:
    num_ranks: int = 1
    zero_stage: int = 1
    dtype: str = "float32"  # bf16 on GPU
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
