"""GRPO's settings: the `grpo` section of the run config (rl.loop.config.KeelConfig), and what the trainer's
GRPO step reads (trainer.worker.TrainerWorker takes an instance across Ray)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GRPOConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mini_batch_size: int = 64  # sequences per optimiser step
    epochs: int = 1  # passes over each rollout batch
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    normalize_std: bool = False
    kl_estimator: str = "unbiased"  # unbiased | k3 | none
    kl_coef: float = 0.01
    offpolicy_delta: float | None = 0.5  # null: no off-policy sequence masking
    mask_kl: bool = False  # true: the off-policy mask drops the KL term too (the paper masks the policy term only)
    old_logprobs: str = "engine"  # pi_old of the ratio and the KL: engine (sampling) | trainer (own, at step start)
    keep_routing: bool = True
    keep_sampling_mask: bool = True
    # Keep Indexer Selection: DSA layers attend to the positions the engine's indexer selected (recorded with
    # rollout.engine.capture_indexer), and the sparse indexer KL is taken over those sets.
    keep_indexer_selection: bool = True
    train_indexer: bool = True
    indexer_lr: float = 1e-3
    indexer_loss_coef: float = 1.0
    indexer_grad_clip: float = 1.0  # the indexer's own gradient-norm clip (its own AdamW; 0: no clip)
    logprob_chunk: int = 1024
