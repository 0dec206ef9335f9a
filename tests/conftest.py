"""Session-wide test settings."""

import os

# Triton decides at decoration time whether a @triton.jit function is interpreted; the kernel tests run
# the Triton kernels on CPU under the interpreter, so it must be on before any test module imports triton
# (vLLM and transformers do). On a GPU machine run the kernel tests with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing is downloaded in the tests: a Hugging Face hub id resolves through the local cache or is an error
# (read by huggingface_hub at import, so set before any test module imports it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
