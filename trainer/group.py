"""The trainer actor group: one Ray actor per rank, gang-scheduled in a placement group.

The driver calls the group; the group splits each batch into one contiguous shard per rank and averages the
ranks' metrics. Weights leave the group only through rank 0's `publish_weights` (a handle for the rollout
client; CPU), its NCCL broadcast to the engines (`open_weight_sync`, `send_weights`; CUDA) and checkpoints
(`save`, `export`); no call returns the weights themselves to the driver.
"""

from __future__ import annotations

import os
import socket

import pyarrow as pa
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.algo.config import GRPOConfig
from rollout.weight_sync import WeightHandle
from trainer.config import TrainerConfig
from trainer.worker import TrainerWorker


def warmup_lr(step: int, base: float, warmup_steps: int) -> float:
    """Linear warm-up to `base` over `warmup_steps` steps (step counts from 0), then constant."""
    return base * min(1.0, (step + 1) / max(warmup_steps, 1))


class TrainerRankDied(RuntimeError):
    """A trainer rank's process died; the message names the rank and the call. The group cannot go on without
    it (its shard of the optimiser state is gone): the run stops, and its last checkpoint resumes it."""


def _pid(actor) -> int:
    """Run on a rank through `__ray_call__`: its process id (named when the rank dies)."""
    return os.getpid()


def _bundle_ip(pg: PlacementGroup, bundle: int) -> str:
    """The IP address of the node holding a ready placement group's bundle."""
    node = placement_group_table(pg)["bundles_to_node_id"][bundle]
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)


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
        placement: tuple[PlacementGroup, list[int]] | None = None,
    ):
        """Arguments as TrainerWorker's; `grpo` and `trainer` cross Ray as dataclass instances. `placement`: a
        ready placement group and each rank's bundle in it (rl.loop.placement.reserve; its owner removes it);
        None: the group makes its own, one bundle per rank, PACK."""
        n = trainer.num_ranks
        self.own_pg = placement is None
        if placement is None:
            bundle = {"CPU": trainer.cpus_per_rank}
            if trainer.gpus_per_rank:
                bundle["GPU"] = trainer.gpus_per_rank
            placement = placement_group([bundle] * n, strategy="PACK"), list(range(n))
            ray.get(placement[0].ready())
        self.pg, bundles = placement
        # Rank 0's node serves the process group's store: its address, not the driver's (another node, maybe).
        master_addr, master_port = _bundle_ip(self.pg, bundles[0]), _free_port()
        actor_cls = ray.remote(TrainerWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=trainer.cpus_per_rank,
                num_gpus=trainer.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundles[i]),
            ).remote(i, n, master_addr, master_port, policy_checkpoint, reference_checkpoint, grpo, trainer, lr, seed,
                     temperature, freeze_backbone)
            for i in range(n)
        ]
        self.failed = False  # a rank died or raised: the others may be stuck in a collective waiting for it
        self.pids: list[int] = []
        self.pids = self._get([w.__ray_call__.remote(_pid) for w in self.workers], "start-up")
        self.publisher_node: str | None = ray.get(self.workers[0].node_id.remote())  # rank 0's Ray node
        self.weight_sync_open = False  # CUDA: whether rank 0 has joined the NCCL weight-sync group
        self.zero3 = trainer.zero_stage == 3  # parameters sharded: reading whole weights takes every rank

    def _get(self, refs: list, what: str) -> list:
        """Results of one call per rank (rank order; refs[i] is rank i's). The first rank to fail ends the wait
        at once: the others would wait for it in their next collective until the backend's timeout (gloo's and
        NCCL's default: 30 min). A dead rank is a TrainerRankDied naming it; a rank's exception is re-raised."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rank = pending.pop(done[0])
            try:
                results[rank] = ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                self.failed = True
                if not self.pids:
                    raise  # a rank that could not start: Ray's error carries the reason
                raise TrainerRankDied(f"trainer rank {rank} of {len(self.workers)} (pid {self.pids[rank]}) died during "
                                      f"{what}: {str(err).strip().splitlines()[0]}") from None
            except Exception:
                self.failed = True
                raise
        return results

    def _shards(self, n_rows: int) -> list[slice]:
        per = n_rows // len(self.workers)
        if per * len(self.workers) != n_rows:
            raise ValueError(f"batch of {n_rows} rows does not split evenly over {len(self.workers)} ranks")
        return [slice(i * per, (i + 1) * per) for i in range(len(self.workers))]

    def grpo_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        shards = [batch.slice(s.start, s.stop - s.start) for s in self._shards(batch.num_rows)]
        results = self._get([w.grpo_step.remote(shard) for w, shard in zip(self.workers, shards, strict=True)],
                            "grpo_step")
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def train_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
        lrs: list[float] | None = None, loss: str = "lm", segment_ids: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One step with a loss kind (see TrainerWorker.train_step); segment_ids [B, T] for packed rows."""
        shards = self._shards(input_ids.shape[0])
        results = self._get(
            [
                w.train_step.remote(input_ids[s], targets[s], loss_mask[s], lrs, loss,
                                    None if segment_ids is None else segment_ids[s])
                for w, s in zip(self.workers, shards, strict=True)
            ],
            "train_step",
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
        """Held-out mean next-token loss, rank 0's (under ZeRO-3 every rank runs it: forwards gather weights)."""
        return self._rank0("eval_loss", ids, sparse, batch_size)

    def publish_weights(self, version: int, file: bool = True, blob: bool = False) -> WeightHandle:
        """Rank 0 publishes the current weights (see TrainerWorker.publish_weights); only the handle comes back."""
        return self._rank0("publish_weights", version, file, blob)

    def open_weight_sync(self, client, world_size: int, engine_dtype: str, bucket_mb: int) -> None:
        """CUDA: rank 0 joins the NCCL weight-sync group with the rollout workers (TrainerWorker.open_weight_sync);
        under ZeRO-3 every rank is called (they gather each bucket along)."""
        workers = self.workers if self.zero3 else self.workers[:1]
        self._get([w.open_weight_sync.remote(client, world_size, engine_dtype, bucket_mb) for w in workers],
                  "open_weight_sync")
        self.weight_sync_open = True

    def send_weights(self, version: int) -> None:
        """CUDA: rank 0 broadcasts the current weights to the rollout engines over NCCL (under ZeRO-3 the other
        ranks gather along)."""
        workers = self.workers if self.zero3 else self.workers[:1]
        self._get([w.send_weights.remote(version) for w in workers], "send_weights")

    def save(self, directory: str, tokenizer_dir: str | None = None) -> None:
        self._get([w.save.remote(directory, tokenizer_dir) for w in self.workers], "save")

    def export(self, directory: str, tokenizer_dir: str | None = None) -> None:
        """The current weights as an HF checkpoint in `directory` (no optimiser state)."""
        self._rank0("export", directory, tokenizer_dir)

    def _rank0(self, method: str, *args):
        """Rank 0's result of a call that reads whole weights; under ZeRO-3 every rank makes it (gathers are
        collectives) and the others return None."""
        workers = self.workers if self.zero3 else self.workers[:1]
        refs = [getattr(w, method).remote(*args) for w in workers]
        return self._get(refs, method)[0]

    def load_optimizer(self, directory: str) -> None:
        self._get([w.load_optimizer.remote(directory) for w in self.workers], "load_optimizer")

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the ranks: each shuts down on its own within `timeout_s`, then is killed. After a failure they are
        killed at once (a survivor may be stuck in a collective with the dead rank and would never answer)."""
        if not self.failed:
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=timeout_s)
            except Exception:  # noqa: BLE001 - the actors are killed below either way
                pass
        for w in self.workers:
            ray.kill(w)
        if self.own_pg:
            remove_placement_group(self.pg)
