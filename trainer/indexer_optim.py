"""The lightning indexer's own optimiser: AdamW with its own gradient-norm clip, outside the DeepSpeed engine.

The indexer trains on its KL loss, the policy on GRPO's; their gradients are disjoint (the indexer sees
detached inputs). In one DeepSpeed optimiser they would still share one global gradient-norm clip, so a
large indexer-KL gradient would shrink the policy's step and the reverse. Here the indexer parameters stay
in the engine's module (forward, checkpoints of the module) but not in its optimiser, and this class steps
them: its grads are averaged over the ranks (ZeRO-1/2 reduce only the parameters in their own optimiser; under
ZeRO-0 DeepSpeed has averaged every gradient already, and averaging equal copies again changes nothing beyond
rounding), clipped by their own norm, and applied by a torch AdamW. Parameters in a low precision (bf16) get fp32 master
copies, as DeepSpeed keeps for the policy. `state_dict` holds everything `--resume` needs to continue exactly.

Under ZeRO-3 DeepSpeed shards the indexer like every parameter of its module (gathering it for its forward and
backward, where autograd still leaves each rank a whole gradient, since it is in no DeepSpeed optimiser). Every
rank then keeps whole fp32 masters, identical on all ranks (same averaged gradients, same steps), and each step
is written back into the shards through DeepSpeed's GatheredParameters.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.distributed as dist


class IndexerOptimizer:
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        max_norm: float,
        world_size: int = 1,
    ):
        """max_norm: the clip of the indexer's own gradient norm (0: no clip); world_size > 1: average the
        gradients over the default process group before each step."""
        if not params:
            raise ValueError("IndexerOptimizer needs at least one parameter")
        self.params = list(params)
        self.max_norm, self.world_size = max_norm, world_size
        # fp32 whole parameters are stepped in place; others through fp32 masters copied back after each step.
        self.sharded = [p for p in self.params if hasattr(p, "ds_id")]  # DeepSpeed ZeRO-3 parameters
        with self._gathered(modify=False):
            self.masters = [p if p.dtype == torch.float32 and not self.sharded else p.detach().float().clone()
                            for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, betas=betas, weight_decay=weight_decay)
        self.steps_skipped = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def has_grad(self) -> bool:
        """Whether any rank has an indexer gradient (a collective: every rank must call it)."""
        flag = torch.tensor([float(any(p.grad is not None for p in self.params))])
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def step(self) -> float | None:
        """Average, clip and apply the indexer gradients, then clear them; returns the gradient norm before
        the clip (None: no rank had an indexer gradient, nothing stepped). A non-finite norm skips the step on
        every rank alike (the norm is taken after the average). Call after backward and before the engine's
        step (DeepSpeed's ZeRO-0 clip would otherwise count these gradients too)."""
        if not self.has_grad():
            return None
        grads = [torch.zeros_like(m) if p.grad is None else p.grad for p, m in zip(self.params, self.masters,
                                                                                     strict=True)]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
        offset = 0
        for master, p in zip(self.masters, self.params, strict=True):
            if master is not p:
                p.grad = None
            master.grad = flat[offset : offset + master.numel()].view_as(master).to(master.dtype)
            offset += master.numel()
        norm = torch.linalg.vector_norm(flat).item()
        if not math.isfinite(norm):
            self.steps_skipped += 1
        else:
            if self.max_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.masters, self.max_norm)
            self.optimizer.step()
            self._copy_back()
        for master in self.masters:
            master.grad = None
        return norm

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _gathered(self, modify: bool) -> contextlib.AbstractContextManager:
        """Whole sharded parameters inside (a collective); with `modify`, rank 0's values are sharded on exit."""
        if not self.sharded:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.sharded, modifier_rank=0 if modify else None)

    def _copy_back(self) -> None:
        with torch.no_grad(), self._gathered(modify=True):
            for master, p in zip(self.masters, self.params, strict=True):
                if master is not p:
                    p.copy_(master)

    def state_dict(self) -> dict:
        """A snapshot (copies: later steps do not change it) of the moments, the masters and the counters."""
        return {
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "masters": [m.detach().cpu().clone() for m in self.masters],
            "steps_skipped": self.steps_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        masters = state["masters"]
        if len(masters) != len(self.masters) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(masters, self.masters, strict=True)
        ):
            raise ValueError("indexer optimiser state does not match this model's indexer parameters")
        with torch.no_grad():
            for master, saved in zip(self.masters, masters, strict=True):
                master.copy_(saved.to(master.device, master.dtype))
        self._copy_back()
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_skipped = int(state.get("steps_skipped", 0))
