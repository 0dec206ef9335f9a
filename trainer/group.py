"""The trainer actor group: one Ray actor per rank, gang-scheduled in a placement group.

The driver calls the group; the group splits each batch into one contiguous shard per rank and averages the
ranks' metrics. Weights leave the group only through rank 0's `publish_weights` (a handle for the rollout
client; CPU), its NCCL broadcast to the engines (`open_weight_sync`, `send_weights`; CUDA) and checkpoints
(`save`, `export`); no call returns the weights themselves to the driver.
"""

from __future__ import annotations

import socket

import pyarrow as pa
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.algo.config import GRPOConfig
from rollout.weight_sync import WeightHandle
from trainer.config import TrainerConfig
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
        grpo: GRPOConfig,
        trainer: TrainerConfig,
        lr: float,
        seed: int,
        temperature: float = 1.0,
        freeze_backbone: bool = False,
    ):
        """Arguments as TrainerWorker's; `grpo` and `trainer` cross Ray as dataclass instances."""
        n = trainer.num_ranks
        bundle = {"CPU": trainer.cpus_per_rank}
        if trainer.gpus_per_rank:
            bundle["GPU"] = trainer.gpus_per_rank
        self.pg = placement_group([bundle] * n, strategy="PACK")
        ray.get(self.pg.ready())
        master_addr, master_port = ray.util.get_node_ip_address(), _free_port()
        actor_cls = ray.remote(TrainerWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=trainer.cpus_per_rank,
                num_gpus=trainer.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(i, n, master_addr, master_port, policy_checkpoint, reference_checkpoint, grpo, trainer, lr, seed,
                     temperature, freeze_backbone)
            for i in range(n)
        ]
        ray.get([w.ping.remote() for w in self.workers])
        self.publisher_node: str | None = ray.get(self.workers[0].node_id.remote())  # rank 0's Ray node
        self.weight_sync_open = False  # CUDA: whether rank 0 has joined the NCCL weight-sync group

    def _shards(self, n_rows: int) -> list[slice]:
        per = n_rows // len(self.workers)
        if per * len(self.workers) != n_rows:
            raise ValueError(f"batch of {n_rows} rows does not split evenly over {len(self.workers)} ranks")
        return [slice(i * per, (i + 1) * per) for i in range(len(self.workers))]

    def grpo_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        shards = [batch.slice(s.start, s.stop - s.start) for s in self._shards(batch.num_rows)]
        results = ray.get([w.grpo_step.remote(shard) for w, shard in zip(self.workers, shards, strict=True)])
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def train_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
        lrs: list[float] | None = None, loss: str = "lm", segment_ids: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One step with a loss kind (see TrainerWorker.train_step); segment_ids [B, T] for packed rows."""
        shards = self._shards(input_ids.shape[0])
        results = ray.get(
            [
                w.train_step.remote(input_ids[s], targets[s], loss_mask[s], lrs, loss,
                                    None if segment_ids is None else segment_ids[s])
                for w, s in zip(self.workers, shards, strict=True)
            ]
        )
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def sft_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, lr: float,
        segment_ids: torch.Tensor | None = None, loss: str = "lm",
    ) -> dict:
        """One SFT step at learning rate `lr` (a loss kind of trainer.objective.LOSSES, "lm" by default),
        reported as {"sft_loss", "skipped"} (+ "indexer_kl" for the kinds that train the indexer)."""
        m = self.train_step(input_ids, targets, loss_mask, [lr], loss, segment_ids)
        extra = {"indexer_kl": m["indexer_kl"]} if "indexer_kl" in m else {}
        return {"sft_loss": m["lm_loss"], "skipped": m["skipped"], **extra}

    def eval_loss(self, ids: torch.Tensor, sparse: bool, batch_size: int = 16) -> float:
        """Held-out mean next-token loss, on rank 0 (every rank holds the whole model under ZeRO-1/2)."""
        return ray.get(self.workers[0].eval_loss.remote(ids, sparse, batch_size))

    def publish_weights(self, version: int, file: bool = True, blob: bool = False) -> WeightHandle:
        """Rank 0 publishes the current weights (see TrainerWorker.publish_weights); only the handle comes back."""
        return ray.get(self.workers[0].publish_weights.remote(version, file, blob))

    def open_weight_sync(self, client, world_size: int, engine_dtype: str, bucket_mb: int) -> None:
        """CUDA: rank 0 joins the NCCL weight-sync group with the rollout workers (TrainerWorker.open_weight_sync)."""
        ray.get(self.workers[0].open_weight_sync.remote(client, world_size, engine_dtype, bucket_mb))
        self.weight_sync_open = True

    def send_weights(self, version: int) -> None:
        """CUDA: rank 0 broadcasts the current weights to the rollout engines over NCCL."""
        ray.get(self.workers[0].send_weights.remote(version))

    def save(self, directory: str, tokenizer_dir: str | None = None) -> None:
        ray.get([w.save.remote(directory, tokenizer_dir) for w in self.workers])

    def export(self, directory: str, tokenizer_dir: str | None = None) -> None:
        """The current weights as an HF checkpoint in `directory` (no optimiser state)."""
        ray.get(self.workers[0].export.remote(directory, tokenizer_dir))

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
