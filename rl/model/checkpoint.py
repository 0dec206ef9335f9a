"""Hugging Face-format checkpoints: config.json + (sharded) safetensors, validated on the way in.

What keel writes, transformers' `DeepseekV32ForCausalLM.from_pretrained` and vLLM read; what a real
DeepSeek-V3.2 release holds (FP8 weights with 128x128 block scales, the MTP layer) keel reads.
Writes are atomic: a checkpoint is built in a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from transformers import DeepseekV32Config

from rl.model.tokenizer import CharTokenizer
from rl.model.transformer import Transformer, init_weights

# Fields whose transformers defaults are the 671B model's: a config.json that omits one is an error,
# not a silent DeepSeek-V3.2-sized default.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
)
INDEXER_FIELDS = ("index_topk", "index_n_heads", "index_head_dim")
# The multi-token-prediction layer of released checkpoints is not part of the causal LM.
IGNORED_PREFIXES = ("model.layers.61.",)


class CheckpointError(ValueError):
    """A config.json or checkpoint that does not describe a keel/DeepSeek-V3.2 model."""


def config_from_dict(fields: dict, source: str = "config") -> DeepseekV32Config:
    """Validate config fields and build the config. `source` names the file in error messages."""
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {missing}")
    fields = dict(fields)
    # Older releases (DeepSeek-V3.2-Exp) spell RoPE as rope_theta + rope_scaling{type: yarn, ...}.
    if "rope_parameters" not in fields:
        rope = dict(fields.pop("rope_scaling", None) or {"rope_type": "default"})
        rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
        rope["rope_theta"] = fields.pop("rope_theta", 10000.0)
        fields["rope_parameters"] = rope
    known = set(DeepseekV32Config.__dataclass_fields__) | {"architectures", "model_type", "transformers_version"}
    try:
        config = DeepseekV32Config(**{k: v for k, v in fields.items() if k in known})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err
    _check_consistency(config, source)
    return config


def _check_consistency(c: DeepseekV32Config, source: str) -> None:
    problems = []
    if c.n_routed_experts % c.n_group:
        problems.append(f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_group}")
    elif c.n_routed_experts // c.n_group < 2:
        problems.append("each expert group needs >= 2 experts (group score = sum of its top-2)")
    if not 1 <= c.topk_group <= c.n_group:
        problems.append(f"topk_group={c.topk_group} must be in [1, n_group={c.n_group}]")
    if not 1 <= c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts // max(c.n_group, 1)):
        problems.append(f"num_experts_per_tok={c.num_experts_per_tok} exceeds the experts in topk_group groups")
    if c.qk_rope_head_dim % 2:
        problems.append(f"qk_rope_head_dim={c.qk_rope_head_dim} must be even")
    if c.index_head_dim < c.qk_rope_head_dim:
        problems.append(f"index_head_dim={c.index_head_dim} < qk_rope_head_dim={c.qk_rope_head_dim}")
    if c.index_topk < 1:
        problems.append(f"index_topk={c.index_topk} must be >= 1")
    if not 0 <= c.first_k_dense_replace <= c.num_hidden_layers:
        problems.append(f"first_k_dense_replace={c.first_k_dense_replace} not in [0, num_hidden_layers]")
    if problems:
        raise CheckpointError(f"{source}: inconsistent config: " + "; ".join(problems))


def load_config(directory: str | Path) -> DeepseekV32Config:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    return config_from_dict(fields, str(path))


def has_indexer(directory: str | Path) -> bool:
    return any(".indexer." in name for name in _tensor_files(Path(directory)))


def build_model(config: DeepseekV32Config, seed: int = 0, with_indexer: bool = True) -> Transformer:
    model = Transformer(config, with_indexer=with_indexer)
    init_weights(model, seed)
    return model


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the shard index or a single model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / fname for name, fname in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def iter_checkpoint_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, FP8 block-quantised weights dequantised, MTP layers skipped."""
    directory = Path(directory)
    files = _tensor_files(directory)
    block = _fp8_block_size(directory)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, "pt") as f:
            for name in names:
                if name.endswith("_scale_inv") or name.startswith(IGNORED_PREFIXES):
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_name = name + "_scale_inv"
                    if block is None or scale_name not in files:
                        raise CheckpointError(f"{path}: FP8 tensor {name} has no {scale_name} or block size")
                    with safe_open(files[scale_name], "pt") as sf:
                        tensor = dequantize_fp8_blocks(tensor, sf.get_tensor(scale_name), block)
                yield name, tensor


def _fp8_block_size(directory: Path) -> tuple[int, int] | None:
    quant = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    size = quant.get("weight_block_size")
    return tuple(size) if size else None


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = W_fp8 * scale_inv[i // block_0, j // block_1] (DeepSeek's 128x128 block-scaled FP8)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def load_state_dict_into(model: Transformer, directory: str | Path, source: str | None = None) -> None:
    """Copy a checkpoint's tensors into `model`, checking names and shapes first."""
    source = source or str(directory)
    expected = model.state_dict()
    seen = set()
    for name, tensor in iter_checkpoint_tensors(directory):
        if name not in expected:
            if ".indexer." in name and not model.with_indexer:
                continue
            raise CheckpointError(f"{source}: tensor {name} is not a parameter of the model this config describes")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} but the config needs "
                f"{tuple(expected[name].shape)}"
            )
        with torch.no_grad():
            expected[name].copy_(tensor.to(expected[name].dtype))
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: checkpoint lacks {len(missing)} tensor(s): {shown}")


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """Build the model a checkpoint's config.json describes and load its weights.

    A dense DeepSeek-V3 checkpoint (no indexer tensors) loads as a model without an indexer.
    """
    config = load_config(directory)
    model = Transformer(config, with_indexer=has_indexer(directory))
    load_state_dict_into(model, directory)
    return model.to(device=device, dtype=dtype)


def save_checkpoint(
    model: Transformer,
    directory: str | Path,
    tokenizer: CharTokenizer | None = None,
    max_shard_size: str = "5GB",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write config.json, safetensors shards (+ index when sharded) and the tokenizer, atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config = model.config.to_dict()
        config["architectures"] = ["DeepseekV32ForCausalLM"]
        config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src onto dst; an existing dst is moved aside first and removed after (never half-written)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
