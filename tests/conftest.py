"""Session-wide test settings."""

import os

# Triton decides at decoration time whether a @triton.jit function is interpreted; the kernel tests run
# the Triton kernels on CPU under the interpreter, so it must be on before any test module imports triton
# (vLLM and transformers do). On a GPU machine run the kernel tests with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
