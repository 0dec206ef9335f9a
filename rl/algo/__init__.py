"""The algorithm: GRPO math, log-probs under the sampling mask, the RolloutBatch contract (a leaf)."""
