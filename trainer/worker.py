"""One trainer rank: keel's model in a DeepSpeed engine, a frozen reference model, GRPO and LM steps.

Runs inside a Ray actor (trainer.group builds the group); every rank gets an equal share of each batch,
DeepSpeed averages the gradients. On CPU: gloo and fp32. On GPU: NCCL and bf16.

Steps: `grpo_step` (a RolloutBatch), `train_step` with a loss kind (`LOSSES`: supervised next-token loss,
the indexer's dense warm-up, the sparse stage) and `sft_step` (the first kind). After an update, rank 0
publishes the weights for the rollout engines itself (`publish_weights`): the bytes go from this process to
/dev/shm and/or Ray's object store, and only a small handle goes back to the driver. On CUDA rank 0 instead
broadcasts them over NCCL through vLLM's weight-transfer engine (`open_weight_sync`, `send_weights`; untested on
a GPU yet). ZeRO-1/2/3 (trainer.sharding): under ZeRO-3 the calls that read whole weights (`state_dict`,
`publish_weights`, `export`, `save`, `eval_loss`) are collectives that every rank makes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

import rollout.weight_sync as weight_sync  # the receiving contract: what a published weight version is
from rl.algo.config import GRPOConfig
from rl.algo.mismatch import step_mismatch
from rl.model.checkpoint import load_model, save_checkpoint
from rl.model.transformer import Transformer
from trainer import sharding
from trainer.batching import TrainTensors, to_train_tensors
from trainer.config import TrainerConfig
from trainer.indexer_optim import IndexerOptimizer
from trainer.objective import LOSSES, grpo_objective, held_out_loss, lm_objective, policy_logprobs

# The indexer's own optimiser state, beside DeepSpeed's files in a checkpoint's optim/state/.
INDEXER_OPTIM_FILE = "indexer_optim.pt"


class TrainerWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        policy_checkpoint: str,
        reference_checkpoint: str | None,
        grpo: GRPOConfig,
        trainer: TrainerConfig,
        lr: float,
        seed: int,
        temperature: float = 1.0,
        freeze_backbone: bool = False,
    ):
        """grpo: the optimiser settings (weight_decay, grad_clip, mini_batch_size, indexer_lr, train_indexer)
        and, for grpo_step, the objective's. temperature: the rollout's sampling temperature (log-probs are
        taken at it). freeze_backbone: only the indexer trains (the dense warm-up); lr is then unused."""
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        import deepspeed  # imported here: it probes the accelerator at import time

        self.rank, self.world_size = rank, world_size
        self.grpo, self.trainer, self.temperature = grpo, trainer, temperature
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[trainer.dtype]
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(seed + rank)

        model = load_model(policy_checkpoint, device=str(self.device))
        self.reference: Transformer | None = None
        if reference_checkpoint:
            self.reference = load_model(reference_checkpoint, device=str(self.device), dtype=self.dtype).eval()
            self.reference.requires_grad_(False)

        # The indexer trains on its own KL loss (its inputs are detached: its gradients and the policy's are
        # disjoint) with its own learning rate. When the backbone trains too, the indexer also has its own
        # optimiser and gradient-norm clip (trainer.indexer_optim, grpo.indexer_grad_clip), outside the engine's
        # optimiser: there the two would share DeepSpeed's global clip, and a large indexer-KL gradient would
        # shrink the policy's step (and the reverse). With freeze_backbone the indexer is the engine's only group.
        groups = []
        own_indexer_optimiser = False
        if freeze_backbone:
            for p in model.backbone_parameters():
                p.requires_grad_(False)
        else:
            groups.append({"params": model.backbone_parameters(), "lr": lr, "weight_decay": grpo.weight_decay})
        if model.with_indexer and grpo.train_indexer:
            if freeze_backbone:
                groups.append({"params": model.indexer_parameters(), "lr": grpo.indexer_lr, "weight_decay": 0.0})
            else:
                own_indexer_optimiser = True
        else:
            for p in model.indexer_parameters():
                p.requires_grad_(False)
        if not groups:
            raise ValueError("freeze_backbone without an indexer to train (grpo.train_indexer off or no indexer)")
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        micro = max(grpo.mini_batch_size // world_size, 1)
        ds_config = sharding.deepspeed_config(trainer.zero_stage, micro, world_size, grpo.grad_clip,
                                              self.dtype == torch.bfloat16)
        self.engine, self.optimizer = sharding.initialize(model, optimizer, ds_config)
        self.model: Transformer = self.engine.module
        self.indexer_optim: IndexerOptimizer | None = None
        if own_indexer_optimiser:
            self.indexer_optim = IndexerOptimizer(self.model.indexer_parameters(), grpo.indexer_lr, (0.9, 0.95),
                                                  0.0, grpo.indexer_grad_clip, world_size)
        # Each group's learning rate as built: sft_step scales them all by one factor.
        self.base_lrs = [group["lr"] for group in self.param_groups()]
        self.steps_done = 0
        self.published: weight_sync.WeightHandle | None = None  # rank 0: the latest version it published
        self.sender: weight_sync.NcclWeightSender | None = None  # rank 0, CUDA: the NCCL weight-sync endpoint
        self.bucket_bytes = 0  # of the CUDA weight sync, once open (every rank under ZeRO-3)

    def ping(self) -> int:
        return self.rank

    def param_groups(self) -> list[dict]:
        """Every optimiser group, in order: the engine's (backbone; or the indexer alone with freeze_backbone),
        then the indexer's own optimiser's when it has one."""
        own = self.indexer_optim.param_groups if self.indexer_optim is not None else []
        return [*self.optimizer.param_groups, *own]

    def _update(self, total: torch.Tensor) -> dict[str, float]:
        """Backward, the indexer's own step (before the engine's: see IndexerOptimizer.step), the engine's step.
        Returns the gradient norms before clipping: the engine's (`grad_norm`) and the indexer's."""
        self.engine.backward(total)
        norms = {}
        if self.indexer_optim is not None:
            indexer_norm = self.indexer_optim.step()
            if indexer_norm is not None:
                norms["indexer_grad_norm"] = indexer_norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            norms["grad_norm"] = float(norm)
        return norms

    def node_id(self) -> str | None:
        """This rank's Ray node (None outside Ray): the rollout client plans weight transport against rank 0's."""
        return weight_sync.current_node()

    # ---- GRPO ---------------------------------------------------------------------------------------

    def _logprobs(self, model, t: TrainTensors, routing, **fwd) -> tuple:
        """`model` is the DeepSpeed engine (gradient), the bare policy, or the reference model."""
        head = (self.model if model is self.engine else model).lm_head
        return policy_logprobs(model, head, t, routing, self.temperature, self.grpo.logprob_chunk, **fwd)

    def grpo_step(self, shard: pa.RecordBatch) -> dict[str, float]:
        """Reference log-probs, then `epochs` passes of GRPO mini-batch updates over this rank's shard."""
        g = self.grpo
        timings = {}
        t0 = time.perf_counter()
        top_k = self.model.config.num_experts_per_tok
        # Recorded routing is read even when not forced: the routing-agreement metric compares against it.
        recorded = shard.column("routed_experts").null_count == 0
        # Recorded indexer selections are read whenever present: indexer_agreement compares against them.
        selected = "indexer_topk" in shard.schema.names and shard.column("indexer_topk").null_count < shard.num_rows
        data = to_train_tensors(
            shard, top_k, with_routing=g.keep_routing or recorded, with_mask=g.keep_sampling_mask,
            with_index_selection=g.keep_indexer_selection or selected,
        )
        data = _to_device(data, self.device)
        valid = (data.targets != 0) | (data.response_mask > 0)
        routing = data.routing if g.keep_routing else None
        # Keep Indexer Selection: every forward of the step attends where the engine attended.
        replay = {"index_selection": data.index_selection if g.keep_indexer_selection else None}

        with torch.no_grad():
            # First look at the batch with the weights that sampled it: train/inference agreement.
            # Indexer selections as configured (replayed or the trainer's own), always compared with the record.
            logp0, entropy0, free = self._logprobs(self.model, data, None, return_routing=True,
                                                   index_selection=data.index_selection,
                                                   follow_selection=g.keep_indexer_selection)
            counted = data.response_mask > 0
            routed = data.routing is not None and free.routing is not None
            mismatch_metrics = step_mismatch(data.old_logp[counted], logp0[counted],
                                             data.routing[valid] if routed else None,
                                             free.routing[valid] if routed else None)
            ref_logp = None
            if g.kl_estimator != "none":
                if self.reference is None:
                    raise RuntimeError("grpo.kl_estimator needs a reference model; none was loaded")
                ref_logp, _, _ = self._logprobs(self.reference, data, routing, **replay)
            # pi_old of the ratio and the KL (rl.algo.grpo): the engine's log-probs (None), or the trainer's own
            # before the first update, under the Keep Routing / Keep Sampling Mask the updates use.
            old_logp = None
            if g.old_logprobs == "trainer":
                old_logp = logp0 if routing is None else self._logprobs(self.model, data, routing, **replay)[0]
        timings["time/ref"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        metrics: dict[str, list[float]] = {}
        skipped = 0
        micro = max(g.mini_batch_size // self.world_size, 1)
        for _ in range(g.epochs):
            for start in range(0, len(data), micro):
                rows = slice(start, start + micro)
                mb = data.select(rows)
                total, m = grpo_objective(
                    self.engine, self.model.lm_head, mb, None if ref_logp is None else ref_logp[rows], g,
                    self.temperature, train_indexer=self.model.with_indexer and g.train_indexer,
                    old_logp=None if old_logp is None else old_logp[rows],
                )
                if not self._all_finite(total):
                    skipped += 1  # every rank skips together: no rank steps on a NaN/inf loss
                    continue
                m.update(self._update(total))
                for k, v in m.items():
                    metrics.setdefault(k, []).append(v)
        self.steps_done += 1
        timings["time/update"] = time.perf_counter() - t1

        result = {k: sum(v) / len(v) for k, v in metrics.items()}
        result.update(timings)
        result.update(
            {
                "skipped_minibatches": float(skipped),
                "indexer_agreement": (free.indexer_agreement.item() if free.indexer_agreement is not None
                                      else float("nan")),
                "entropy": entropy0[counted].mean().item() if counted.any() else 0.0,
                "trained_tokens": float(counted.sum().item()),
                **mismatch_metrics,
            }
        )
        return result

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # ---- LM steps: SFT, pretraining, the indexer warm-up -----------------------------------------

    def train_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
        lrs: list[float] | None = None, loss: str = "lm", segment_ids: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One optimiser step on this rank's rows with a loss kind from `trainer.objective.LOSSES`.

        lrs: learning rates for the first len(lrs) optimiser groups (`param_groups`: backbone, then indexer;
        with freeze_backbone the indexer is the only group); None keeps them. segment_ids: [B, T] for packed rows
        (`rl.loop.data.pack_sft_sequences`), None for right-padded ones. Returns the loss's metrics and
        `skipped` (1.0 when the loss was NaN/inf on some rank and no rank stepped).
        """
        if loss not in LOSSES:
            raise ValueError(f"unknown loss kind {loss!r}; choose one of {LOSSES}")
        for group, lr in zip(self.param_groups(), lrs or [], strict=False):
            group["lr"] = lr
        input_ids, targets, loss_mask = (x.to(self.device) for x in (input_ids, targets, loss_mask))
        if segment_ids is not None:
            segment_ids = segment_ids.to(self.device)
        self.engine.train()
        total, metrics = lm_objective(self.engine, self.model, input_ids, targets, loss_mask, loss,
                                      self.grpo.indexer_loss_coef, self.grpo.logprob_chunk, segment_ids)
        if not self._all_finite(total):
            return {**dict.fromkeys(metrics, float("nan")), "skipped": 1.0}
        metrics.update(self._update(total))
        return {**metrics, "skipped": 0.0}

    def sft_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, lr: float,
        segment_ids: torch.Tensor | None = None,
    ) -> dict:
        """Next-token cross-entropy on the masked positions (response tokens only): `train_step` with loss
        "lm", its loss reported as `sft_loss`.

        `lr` is the first group's (the backbone's) learning rate; every other group gets `lr` times the ratio
        of its base learning rate to the first's (`base_lrs`, as built: the indexer keeps indexer_lr / lr), so
        after GRPO no group is left at a stale rate. The LM loss gives the indexer no gradient (top-k selection
        is not differentiable), so with its own optimiser the indexer does not move in SFT."""
        lrs = [lr * base / self.base_lrs[0] if self.base_lrs[0] else lr for base in self.base_lrs]
        m = self.train_step(input_ids, targets, loss_mask, lrs, "lm", segment_ids)
        return {"sft_loss": m["lm_loss"], "skipped": m["skipped"]}

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, sparse: bool, batch_size: int = 16) -> float:
        """Mean next-token loss on ids [N, T + 1] (`trainer.objective.held_out_loss`)."""
        return held_out_loss(self.model, ids.to(self.device), sparse, batch_size)

    # ---- weights and checkpoints --------------------------------------------------------------------

    @property
    def zero3(self) -> bool:
        """Parameters sharded over the ranks: reading whole weights (`state_dict`, `publish_weights`, `export`,
        `save`, `eval_loss`) is then a collective every rank takes part in (TrainerGroup calls them all)."""
        return self.trainer.zero_stage == 3

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (under ZeRO-3 gathered bucket by bucket, every rank taking part), None
        elsewhere."""
        if not self.zero3 and self.rank != 0:
            return None
        return sharding.gathered_state(self.model, keep=self.rank == 0)

    def publish_weights(self, version: int, file: bool = True, blob: bool = False) -> weight_sync.WeightHandle | None:
        """Rank 0: write the current weights once for the rollout engines and return the handle (a path, the
        names and shapes, an object-store ref); `file`/`blob` as the rollout client's transport plan says. The
        safetensors file is written bucket by bucket (`sharding.write_safetensors`: gathered per bucket under
        ZeRO-3, every rank taking part; the others return None), so no process holds the whole model for it;
        the blob is put from the file's pages. The version published before is released here (its file
        deleted): the engines loaded it already."""
        if self.rank != 0:
            if not self.zero3:
                raise RuntimeError("only trainer rank 0 publishes weights")
            sharding.write_safetensors(self.model, None)
            return None
        handle = sharding.publish(self.model, version, file, blob, weight_sync.current_node())
        previous, self.published = self.published, handle
        if previous is not None:
            weight_sync.release_weights(previous)
        return handle

    def open_weight_sync(self, client, world_size: int, engine_dtype: str, bucket_mb: int) -> None:
        """CUDA: rank 0 joins the NCCL weight-sync group with the rollout workers (`client`: their
        `WorkerWeightSyncClient`; `world_size`: 1 + their engine ranks). Weights then go out with `send_weights`,
        streamed in buckets of at most `bucket_mb` MB cast to `engine_dtype` (`sharding.weight_stream`); under
        ZeRO-3 every rank is called, and the others take part in each bucket's gather. Not yet run on a GPU."""
        if self.bucket_bytes:
            raise RuntimeError("the NCCL weight-sync group is open already")
        if self.rank == 0:
            stream = sharding.weight_stream(self.model, weight_sync.wire_dtype(engine_dtype), bucket_mb << 20)
            self.sender = weight_sync.NcclWeightSender(client, stream, bucket_mb << 20, world_size)
        elif not self.zero3:
            raise RuntimeError("only trainer rank 0 sends weights (every rank takes part under ZeRO-3)")
        self.bucket_bytes = bucket_mb << 20  # open

    def send_weights(self, version: int) -> None:
        """CUDA: rank 0 broadcasts the current weights to every rollout engine over NCCL (`open_weight_sync`);
        under ZeRO-3 the other ranks gather along."""
        if not self.bucket_bytes:
            raise RuntimeError("send_weights before open_weight_sync")
        if self.rank == 0:
            self.sender.send(version)
        else:
            sharding.follow_weight_stream(self.model, self.bucket_bytes)

    def export(self, directory: str, tokenizer_dir: str | None = None) -> None:
        """Rank 0: the weights as an HF checkpoint in `directory` (with the tokenizer of `tokenizer_dir`); under
        ZeRO-3 the consolidated weights, every rank taking part in the gathers."""
        state = self.state_dict()
        if self.rank != 0:
            return
        tok = None
        if tokenizer_dir:
            from rl.model.tokenizer import CharTokenizer

            tok = CharTokenizer.load(tokenizer_dir)
        export = Transformer(self.model.config, with_indexer=self.model.with_indexer)
        export.load_state_dict(state)
        save_checkpoint(export, directory, tokenizer=tok)

    def save(self, directory: str, tokenizer_dir: str | None = None) -> None:
        """HF weights (rank 0) + DeepSpeed optimizer state (all ranks) under `directory`, and the indexer's own
        optimiser (rank 0: every rank holds the same one) in optim/state/INDEXER_OPTIM_FILE."""
        self.export(str(Path(directory) / "model"), tokenizer_dir)
        if dist.is_initialized():
            dist.barrier()
        self.engine.save_checkpoint(str(Path(directory) / "optim"), tag="state")
        if self.indexer_optim is not None and self.rank == 0:
            path = Path(directory) / "optim" / "state" / INDEXER_OPTIM_FILE
            torch.save(self.indexer_optim.state_dict(), path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)

    def load_optimizer(self, directory: str) -> None:
        """Weights and optimiser states as `save` wrote them, the indexer's own optimiser included."""
        self.engine.load_checkpoint(
            str(Path(directory) / "optim"), tag="state", load_module_strict=True,
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )
        if self.indexer_optim is not None:
            path = Path(directory) / "optim" / "state" / INDEXER_OPTIM_FILE
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: the checkpoint holds no state of the indexer's own "
                                        "optimiser (written by an older keel?), so training cannot resume exactly")
            self.indexer_optim.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.shutdown()
            self.sender = None
        if self.published is not None:
            weight_sync.release_weights(self.published)
            self.published = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_device(t: TrainTensors, device: torch.device) -> TrainTensors:
    moved = {f: (None if getattr(t, f) is None else getattr(t, f).to(device)) for f in t.__dataclass_fields__}
    return TrainTensors(**moved)
