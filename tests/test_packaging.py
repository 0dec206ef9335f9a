"""keel's top-level packages (`kernels`, `trainer`, `rewards`, `rollout`, `rl`) share names with unrelated
PyPI packages; Hugging Face's `kernels` is probed by transformers. With keel installed, transformers and
vLLM must not take keel's packages for those.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent(
    """
    import importlib.metadata as md
    import kernels, rl, rollout, trainer, rewards

    # keel's packages are keel's, provided by the keel-rl distribution.
    for mod in (kernels, rl, rollout, trainer, rewards):
        assert mod.__file__.startswith(REPO), mod.__file__
    provided = md.packages_distributions()
    assert "keel-rl" in provided.get("kernels", []), provided.get("kernels")

    # transformers does not think the Hub `kernels` package is installed, and its hub-kernel decorated
    # layers (RMSNorm, rotary) run their own PyTorch code.
    from transformers.utils import is_kernels_available
    assert not is_kernels_available()
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    from rl.model.presets import preset
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**preset("tiny")))
    assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()

    # vLLM's model code and its Triton helpers import cleanly next to keel's packages.
    import vllm
    import vllm.model_executor.models.deepseek_v2  # noqa: F401
    import sys
    assert sys.modules["kernels"].__file__.startswith(REPO)  # still keel's after vLLM's imports
    print("ok")
    """
)


def test_transformers_and_vllm_do_not_mistake_keels_packages(tmp_path):
    # A fresh interpreter outside the repo: imports resolve through the installed distribution only.
    script = f"REPO = {str(REPO)!r}\n" + PROBE
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
