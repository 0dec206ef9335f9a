"""The DSA-MoE model and its formats: the module, HF-format checkpoints, presets, tokenizers (a leaf: imports
nothing of keel's but `kernels/`)."""
