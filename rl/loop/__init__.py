"""The run loop: config, run directory, tasks (prompts or agent episodes), the RL step, metrics."""
