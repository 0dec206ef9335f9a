"""Hugging Face-format checkpoints: config.json + (sharded) safetensors, validated on the way in.

What keel writes, transformers' `DeepseekV32ForCausalLM.from_pretrained` and vLLM read; what a real
DeepSeek-V3.2 release holds (FP8 weights with 128x128 block scales, the MTP layer) keel reads.
Writes are atomic: a checkpoint is built in a temporary sibling directory and renamed into place.

Every way a checkpoint's files can be wrong that keel can detect (truncated or corrupted safetensors, a
malformed or wrongly typed config.json, shard index, generation_config.json or tokenizer file) is a
CheckpointError whose message starts with the file's path and names the field or tensor where there is one;
`check_checkpoint` reads every file that way. A missing config.json or weights file is FileNotFoundError.
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
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import DeepseekV32Config

from rl.model.tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer, has_tokenizer
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


INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def config_from_dict(fields: dict, source: str = "config") -> DeepseekV32Config:
    """Validate config fields and build the config. `source` names the file in error messages."""
    if not isinstance(fields, dict):
        raise CheckpointError(f"{source}: expected a JSON object of config fields, got {type(fields).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {missing}")
    fields = dict(fields)
    # Older releases (DeepSeek-V3.2-Exp) spell RoPE as rope_theta + rope_scaling{type: yarn, ...}.
    if "rope_parameters" not in fields:
        scaling = fields.pop("rope_scaling", None) or {"rope_type": "default"}
        if not isinstance(scaling, dict):
            raise CheckpointError(f"{source}: field 'rope_scaling' must be an object, got {scaling!r}")
        rope = dict(scaling)
        rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
        rope["rope_theta"] = fields.pop("rope_theta", 10000.0)
        fields["rope_parameters"] = rope
    rope = fields["rope_parameters"]
    if isinstance(rope, dict):  # transformers only checks that it is a dict; keel computes with its numbers
        for key, value in rope.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key == "rope_type" and not isinstance(value, str):
                raise CheckpointError(f"{source}: field 'rope_parameters.rope_type' must be a string, got {value!r}")
            if key != "rope_type" and value is not None and not number and not isinstance(value, list):
                raise CheckpointError(f"{source}: field 'rope_parameters.{key}' must be a number, got {value!r}")
    known = set(DeepseekV32Config.__dataclass_fields__) | {"architectures", "model_type", "transformers_version"}
    kwargs = {k: v for k, v in fields.items() if k in known}
    try:
        config = DeepseekV32Config(**kwargs)
    except StrictDataclassError as err:
        # huggingface_hub's strict dataclass names the field: "Validation error for field 'hidden_size': ..."
        raise CheckpointError(f"{source}: {_one_line(err)}") from err
    except Exception as err:  # noqa: BLE001 - transformers' own processing of a field it did not type-check
        raise CheckpointError(f"{source}: {_culprit(kwargs)}{_one_line(err)}") from err
    _check_consistency(config, source)
    return config


def _culprit(kwargs: dict) -> str:
    """'field NAME: ' for the first field without which the config builds ('' if none): the errors transformers
    raises while processing a field (AttributeError, KeyError, ...) do not say which one it was."""
    for key in kwargs:
        try:
            DeepseekV32Config(**{k: v for k, v in kwargs.items() if k != key})
        except Exception:  # noqa: BLE001 - still failing: not this field
            continue
        return f"field '{key}': "
    return ""


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
    return config_from_dict(_read_json(path), str(path))


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def has_indexer(directory: str | Path) -> bool:
    return any(".indexer." in name for name in _tensor_files(Path(directory)))


def build_model(config: DeepseekV32Config, seed: int = 0, with_indexer: bool = True) -> Transformer:
    model = Transformer(config, with_indexer=with_indexer)
    init_weights(model, seed)
    return model


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the shard index or a single model.safetensors."""
    index = directory / INDEX_FILE
    if index.exists():
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: field 'weight_map' must be an object of tensor name -> file name")
        files = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or Path(fname).name != fname:
                raise CheckpointError(f"{index}: weight_map entry for tensor {name} must be a file name, got {fname!r}")
            if not (directory / fname).is_file():
                raise CheckpointError(f"{index}: tensor {name} is in {fname}, which does not exist")
            files[name] = directory / fname
        return files
    single = directory / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor {INDEX_FILE}")
    with _open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open_safetensors(path: Path):
    """safe_open, with a truncated or corrupted file (header, sizes, offsets) a CheckpointError naming it and,
    where one is at fault, the tensor."""
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        detail = _diagnose_safetensors(path) or _one_line(err)
        raise CheckpointError(f"{path}: not a readable safetensors file: {detail}") from err


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}


def _diagnose_safetensors(path: Path) -> str | None:
    """What is wrong with a safetensors file safe_open refused, in its own terms (None: not found here)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            text = f.read(length) if len(prefix) == 8 and 8 + length <= size else b""
    except OSError as err:
        return _one_line(err)
    if size < 8:
        return f"the file has {size} bytes, fewer than the 8 of its header length (truncated)"
    if 8 + length > size:
        return f"the header length says {length} bytes but only {size - 8} follow (truncated or corrupted)"
    try:
        header = json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"the header is not valid JSON ({err})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    available, covered = size - 8 - length, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"tensor {name}: its header entry is not an object"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPE_BYTES:
            return f"tensor {name}: unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            return f"tensor {name}: shape {shape!r} is not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"tensor {name}: data_offsets {offsets!r} are not [begin, end]"
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _SAFETENSORS_DTYPE_BYTES[dtype]:
            return (f"tensor {name}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape {shape} "
                    f"of {dtype} needs {numel * _SAFETENSORS_DTYPE_BYTES[dtype]}")
        if offsets[1] > available:
            return (f"tensor {name}: its data ends at byte {offsets[1]} of a data section of {available} bytes "
                    "(truncated)")
        covered = max(covered, offsets[1])
    if covered != available:
        return f"the tensors cover {covered} bytes of a data section of {available} (truncated or corrupted)"
    return None


def _get_tensor(f, path: Path, name: str) -> torch.Tensor:
    try:
        tensor = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: tensor {name} cannot be read ({_one_line(err)})") from err
    if not (tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn):
        raise CheckpointError(f"{path}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                              "weights must be floating point")
    return tensor


def _iter_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    files = _tensor_files(directory)
    block = _fp8_block_size(directory)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with _open_safetensors(path) as f:
            stored = set(f.keys())
            for name in names:
                if name.endswith("_scale_inv") or name.startswith(IGNORED_PREFIXES):
                    continue
                if name not in stored:
                    raise CheckpointError(f"{directory / INDEX_FILE}: puts tensor {name} in {path.name}, which has "
                                          "no such tensor")
                tensor = _get_tensor(f, path, name)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_name = name + "_scale_inv"
                    if block is None or scale_name not in files:
                        raise CheckpointError(f"{path}: FP8 tensor {name} has no {scale_name} or block size")
                    with _open_safetensors(files[scale_name]) as sf:
                        if scale_name not in sf.keys():
                            raise CheckpointError(f"{files[scale_name]}: has no tensor {scale_name}")
                        scale = _get_tensor(sf, files[scale_name], scale_name)
                    try:
                        tensor = dequantize_fp8_blocks(tensor, scale, block)
                    except (RuntimeError, ValueError) as err:
                        raise CheckpointError(f"{path}: FP8 tensor {name} does not fit its {scale_name} "
                                              f"({_one_line(err)})") from err
                yield name, tensor, path


def iter_checkpoint_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, FP8 block-quantised weights dequantised, MTP layers skipped."""
    for name, tensor, _ in _iter_tensors(Path(directory)):
        yield name, tensor


def _fp8_block_size(directory: Path) -> tuple[int, int] | None:
    path = directory / "config.json"
    config = _read_json(path)
    quant = (config.get("quantization_config") if isinstance(config, dict) else None) or {}
    if not isinstance(quant, dict):
        raise CheckpointError(f"{path}: field 'quantization_config' must be an object, got {quant!r}")
    size = quant.get("weight_block_size")
    if not size:
        return None
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)):
        raise CheckpointError(f"{path}: field 'quantization_config.weight_block_size' must be two positive "
                              f"integers, got {size!r}")
    return tuple(size)


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
    for name, tensor, path in _iter_tensors(Path(directory)):
        if name not in expected:
            if ".indexer." in name and not model.with_indexer:
                continue
            raise CheckpointError(f"{path}: tensor {name} is not a parameter of the model this config describes")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)} but the config needs "
                f"{tuple(expected[name].shape)}"
            )
        if not expected[name].is_meta:  # check_checkpoint: shapes only
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
    model = _build(config, directory, has_indexer(directory))
    load_state_dict_into(model, directory)
    return model.to(device=device, dtype=dtype)


def _build(config: DeepseekV32Config, directory: str | Path, with_indexer: bool) -> Transformer:
    try:
        return Transformer(config, with_indexer=with_indexer)
    except (TypeError, ValueError, KeyError, RuntimeError, ZeroDivisionError) as err:
        raise CheckpointError(f"{Path(directory) / 'config.json'}: describes no model keel can build "
                              f"({_one_line(err)})") from err


def load_tokenizer(directory: str | Path, vocab_size: int | None = None) -> Tokenizer | None:
    """The checkpoint's tokenizer (None when it has none), its files and generation_config.json checked; with
    vocab_size, every token id must have a row in the model's embedding. The tokenizer must have a stop token."""
    directory = Path(directory)
    if not has_tokenizer(directory):
        return None
    load_generation_config(directory, vocab_size)
    try:
        tokenizer = Tokenizer.load(directory)
    except ValueError as err:  # TokenizerError: names the file and the field
        raise CheckpointError(_one_line(err)) from err
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{tokenizer.vocab_file}: the tokenizer has {tokenizer.vocab_size} token ids, more than "
                              f"the model's vocab_size {vocab_size} (config.json): ids >= {vocab_size} have no "
                              "embedding row")
    if not tokenizer.stop_ids:
        raise CheckpointError(f"{directory / TOKENIZER_CONFIG_FILE}: no 'eos_token', and {GENERATION_CONFIG_FILE} "
                              "names no eos_token_id: generation would never stop")
    return tokenizer


# generation_config.json fields vLLM and transformers read, by the JSON types they accept.
_GENERATION_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "length_penalty"), (int, float)),
    **dict.fromkeys(("top_k", "max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams",
                     "num_return_sequences"), (int,)),
    **dict.fromkeys(("do_sample", "use_cache"), (bool,)),
    "transformers_version": (str,),
}
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def load_generation_config(directory: str | Path, vocab_size: int | None = None) -> dict | None:
    """The checkpoint's generation_config.json (None when it has none), its known fields type-checked and its
    token ids checked against vocab_size: vLLM takes its default sampling settings and stop ids from it."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.exists():
        return None
    fields = _read_json(path)
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(fields).__name__}")
    for key, types in _GENERATION_TYPES.items():
        value = fields.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CheckpointError(f"{path}: field '{key}' must be {' or '.join(t.__name__ for t in types)}, "
                                  f"got {value!r}")
    for key in _TOKEN_ID_FIELDS:
        value = fields.get(key)
        ids = value if isinstance(value, list) else [] if value is None else [value]
        for token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise CheckpointError(f"{path}: field '{key}' must be a token id or a list of them, got {value!r}")
            if vocab_size is not None and token >= vocab_size:
                raise CheckpointError(f"{path}: field '{key}' holds token id {token}, outside the model's "
                                      f"vocab_size {vocab_size}")
    return fields


def check_checkpoint(directory: str | Path) -> None:
    """Read every file of a checkpoint as keel and vLLM will: config.json, the shard index and every safetensors
    file (each tensor read and its shape checked against the config, on the meta device: nothing is kept),
    generation_config.json and the tokenizer files when present. A fault is a CheckpointError naming the file."""
    config = load_config(directory)
    with torch.device("meta"):
        model = _build(config, directory, has_indexer(directory))
    load_state_dict_into(model, directory)
    load_generation_config(directory, config.vocab_size)
    load_tokenizer(directory, config.vocab_size)


def save_checkpoint(
    model: Transformer,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
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
