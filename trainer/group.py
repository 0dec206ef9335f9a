"""The trainer actor group: one Ray actor per rank, gang-scheduled in a placement group."""

from __future__ import annotations

import socket

import pyarrow as pa
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainer.worker import TrainerWorker


def warmup_lr(step: int, base: float, warmup_steps: int) -> float:
    """Linear warm-up to `base` over `warmup_steps` steps (step counts from 0), then constant."""
    return base * min(1.0, (step + 1) / max(warmup_steps, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TrainerGroup:
    """Driver-side handle: splits each batch into equal contiguous shards, one per rank, and averages metrics."""

    def __init__(
        self,
        policy_checkpoint: str,
        reference_checkpoint: str | None,
        grpo: dict,
        trainer: dict,
        lr: float,
        seed: int,
    ):
        n = trainer["num_ranks"]
        bundle = {"CPU": trainer["cpus_per_rank"]}
        if trainer["gpus_per_rank"]:
            bundle["GPU"] = trainer["gpus_per_rank"]
        self.pg = placement_group([bundle] * n, strategy="PACK")
        ray.get(self.pg.ready())
        master_addr, master_port = ray.util.get_node_ip_address(), _free_port()
        actor_cls = ray.remote(TrainerWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=trainer["cpus_per_rank"],
                num_gpus=trainer["gpus_per_rank"],
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(i, n, master_addr, master_port, policy_checkpoint, reference_checkpoint, grpo, trainer, lr, seed)
            for i in range(n)
        ]
        ray.get([w.ping.remote() for w in self.workers])

    def _shards(self, n_rows: int) -> list[slice]:
        per = n_rows // len(self.workers)
        if per * len(self.workers) != n_rows:
            raise ValueError(f"batch of {n_rows} rows does not split evenly over {len(self.workers)} ranks")
        return [slice(i * per, (i + 1) * per) for i in range(len(self.workers))]

    def grpo_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        shards = [batch.slice(s.start, s.stop - s.start) for s in self._shards(batch.num_rows)]
        results = ray.get([w.grpo_step.remote(shard) for w, shard in zip(self.workers, shards, strict=True)])
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def sft_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, lr: float,
        segment_ids: torch.Tensor | None = None,
    ) -> dict:
        """One SFT step; segment_ids [B, T] when the rows are packed (see TrainerWorker.sft_step)."""
        shards = self._shards(input_ids.shape[0])
        results = ray.get(
            [
                w.sft_step.remote(input_ids[s], targets[s], loss_mask[s], lr,
                                  None if segment_ids is None else segment_ids[s])
                for w, s in zip(self.workers, shards, strict=True)
            ]
        )
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get([w.state_dict.remote() for w in self.workers])[0]

    def save(self, directory: str, tokenizer_dir: str | None = None) -> None:
        ray.get([w.save.remote(directory, tokenizer_dir) for w in self.workers])

    def load_optimizer(self, directory: str) -> None:
        ray.get([w.load_optimizer.remote(directory) for w in self.workers])

    def shutdown(self) -> None:
        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001 - the actors are killed below either way
            pass
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
