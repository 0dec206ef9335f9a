"""One trainer rank: keel's model in a DeepSpeed engine, a frozen reference model, GRPO and SFT steps.

Runs inside a Ray actor (trainer.group builds the group); every rank gets an equal share of each batch,
DeepSpeed averages the gradients. On CPU: gloo and fp32. On GPU: NCCL and bf16.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

from rl.algo.logprobs import token_logprobs
from rl.model.checkpoint import load_model, save_checkpoint
from rl.model.transformer import Transformer
from trainer.batching import TrainTensors, to_train_tensors
from trainer.objective import grpo_objective, policy_logprobs


class TrainerWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        policy_checkpoint: str,
        reference_checkpoint: str | None,
        grpo: dict,
        trainer: dict,
        lr: float,
        seed: int,
    ):
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        import deepspeed  # imported here: it probes the accelerator at import time

        self.rank, self.world_size = rank, world_size
        self.grpo, self.trainer = dict(grpo), dict(trainer)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[trainer["dtype"]]
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(seed + rank)

        model = load_model(policy_checkpoint, device=str(self.device))
        self.reference: Transformer | None = None
        if reference_checkpoint:
            self.reference = load_model(reference_checkpoint, device=str(self.device), dtype=self.dtype).eval()
            self.reference.requires_grad_(False)

        # The indexer trains on its own KL loss with its own learning rate; its gradients and the policy's
        # are disjoint by construction (detached indexer inputs), so one AdamW with two groups is two optimisers.
        groups = [{"params": model.backbone_parameters(), "lr": lr, "weight_decay": grpo["weight_decay"]}]
        if model.with_indexer and grpo["train_indexer"]:
            groups.append({"params": model.indexer_parameters(), "lr": grpo["indexer_lr"], "weight_decay": 0.0})
        else:
            for p in model.indexer_parameters():
                p.requires_grad_(False)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        micro = max(grpo["mini_batch_size"] // world_size, 1)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro * world_size,
            "gradient_clipping": grpo["grad_clip"],
            "zero_optimization": {"stage": trainer["zero_stage"]},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model: Transformer = self.engine.module
        self.steps_done = 0

    def ping(self) -> int:
        return self.rank

    # ---- GRPO ---------------------------------------------------------------------------------------

    def _logprobs(self, model, t: TrainTensors, routing, **fwd) -> tuple:
        """`model` is the DeepSpeed engine (gradient), the bare policy, or the reference model."""
        head = (self.model if model is self.engine else model).lm_head.weight
        return policy_logprobs(model, head, t, routing, self.grpo["temperature"], self.grpo["logprob_chunk"], **fwd)

    def grpo_step(self, shard: pa.RecordBatch) -> dict[str, float]:
        """Reference log-probs, then `epochs` passes of GRPO mini-batch updates over this rank's shard."""
        g = self.grpo
        timings = {}
        t0 = time.perf_counter()
        top_k = self.model.config.num_experts_per_tok
        # Recorded routing is read even when not forced: the routing-agreement metric compares against it.
        recorded = shard.column("routed_experts").null_count == 0
        data = to_train_tensors(
            shard, top_k, with_routing=g["keep_routing"] or recorded, with_mask=g["keep_sampling_mask"]
        )
        data = _to_device(data, self.device)
        valid = (data.targets != 0) | (data.response_mask > 0)
        routing = data.routing if g["keep_routing"] else None

        with torch.no_grad():
            # First look at the batch with the weights that sampled it: train/inference agreement.
            logp0, entropy0, free = self._logprobs(self.model, data, None, return_routing=True)
            counted = data.response_mask > 0
            mismatch = (logp0 - data.old_logp).abs()[counted].mean().item() if counted.any() else 0.0
            agreement = float("nan")
            if data.routing is not None and free.routing is not None:
                same = (free.routing.sort(-1).values == data.routing.sort(-1).values).all(-1)
                agreement = same[valid].float().mean().item()
            ref_logp = None
            if g["kl_estimator"] != "none":
                if self.reference is None:
                    raise RuntimeError("grpo.kl_estimator needs a reference model; none was loaded")
                ref_logp, _, _ = self._logprobs(self.reference, data, routing)
        timings["time/ref"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        metrics: dict[str, list[float]] = {}
        skipped = 0
        micro = max(g["mini_batch_size"] // self.world_size, 1)
        for _ in range(g["epochs"]):
            for start in range(0, len(data), micro):
                rows = slice(start, start + micro)
                mb = data.select(rows)
                total, m = grpo_objective(
                    self.engine, self.model.lm_head.weight, mb, None if ref_logp is None else ref_logp[rows], g,
                    train_indexer=self.model.with_indexer and g["train_indexer"],
                )
                if not self._all_finite(total):
                    skipped += 1  # every rank skips together: no rank steps on a NaN/inf loss
                    continue
                self.engine.backward(total)
                self.engine.step()
                for k, v in m.items():
                    metrics.setdefault(k, []).append(v)
        self.steps_done += 1
        timings["time/update"] = time.perf_counter() - t1

        result = {k: sum(v) / len(v) for k, v in metrics.items()}
        result.update(timings)
        result.update(
            {
                "skipped_minibatches": float(skipped),
                "routing_agreement": agreement,
                "logp_mismatch_first": mismatch,
                "entropy": entropy0[counted].mean().item() if counted.any() else 0.0,
                "trained_tokens": float(counted.sum().item()),
            }
        )
        return result

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # ---- SFT ----------------------------------------------------------------------------------------

    def sft_step(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, lr: float,
        segment_ids: torch.Tensor | None = None,
    ) -> dict:
        """One step of next-token cross-entropy on the masked positions (response tokens only).

        segment_ids: [B, T] for packed rows (`rl.loop.data.pack_sft_sequences`), None for right-padded ones.
        """
        for group in self.optimizer.param_groups[:1]:
            group["lr"] = lr
        input_ids, targets, loss_mask = (x.to(self.device) for x in (input_ids, targets, loss_mask))
        if segment_ids is not None:
            segment_ids = segment_ids.to(self.device)
        out = self.engine(input_ids, segment_ids=segment_ids)
        logp, _ = token_logprobs(out.hidden, self.model.lm_head.weight, targets, chunk_size=self.grpo["logprob_chunk"])
        loss = -(logp * loss_mask).sum() / loss_mask.sum().clamp(min=1)
        if not self._all_finite(loss):
            return {"sft_loss": float("nan"), "skipped": 1.0}
        self.engine.backward(loss)
        self.engine.step()
        return {"sft_loss": loss.item(), "skipped": 0.0}

    # ---- weights and checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (ZeRO-1/2 keep whole parameters on every rank), None elsewhere."""
        if self.rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.model.state_dict().items()}

    def save(self, directory: str, tokenizer_dir: str | None = None) -> None:
        """HF weights (rank 0) + DeepSpeed optimizer state (all ranks) under `directory`."""
        state = self.state_dict()
        directory = Path(directory)
        if self.rank == 0:
            tok = None
            if tokenizer_dir:
                from rl.model.tokenizer import CharTokenizer

                tok = CharTokenizer.load(tokenizer_dir)
            export = Transformer(self.model.config, with_indexer=self.model.with_indexer)
            export.load_state_dict(state)
            save_checkpoint(export, directory / "model", tokenizer=tok)
        if dist.is_initialized():
            dist.barrier()
        self.engine.save_checkpoint(str(directory / "optim"), tag="state")

    def load_optimizer(self, directory: str) -> None:
        self.engine.load_checkpoint(
            str(Path(directory) / "optim"), tag="state", load_module_strict=True,
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_device(t: TrainTensors, device: torch.device) -> TrainTensors:
    moved = {f: (None if getattr(t, f) is None else getattr(t, f).to(device)) for f in t.__dataclass_fields__}
    return TrainTensors(**moved)
