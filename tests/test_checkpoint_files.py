"""Checkpoint files that are truncated, corrupted or retyped: every failure to read one is a CheckpointError whose
message names the file (and the field or tensor where there is one), never a raw error from json, safetensors,
huggingface_hub or torch. Each case mutates one file of a small sharded checkpoint and reads it back."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from transformers import DeepseekV32Config

from rl.model.checkpoint import (
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    REQUIRED_FIELDS,
    CheckpointError,
    build_model,
    check_checkpoint,
    load_model,
    save_checkpoint,
)
from rl.model.presets import preset
from rl.model.tokenizer import TOKENIZER_FILE, CharTokenizer

GENERATION = {"bos_token_id": 1, "eos_token_id": [2], "do_sample": True, "temperature": 1.0, "top_k": 8,
              "top_p": 1.0, "max_new_tokens": 16, "transformers_version": "5.19.0"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    model = build_model(DeepseekV32Config(**preset("tiny")), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "ok"
    save_checkpoint(model, path, tokenizer=CharTokenizer(), max_shard_size="300KB",
                    extra_files={GENERATION_CONFIG_FILE: json.dumps(GENERATION, indent=1)})
    check_checkpoint(path)  # the unmodified checkpoint reads cleanly
    return path


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _retyped(value):
    """Values of other JSON types than `value`'s."""
    if isinstance(value, bool):
        return ["yes", 1]
    if isinstance(value, int):
        return [str(value), value + 0.5, [value]]
    if isinstance(value, float):
        return ["x", [value]]
    if isinstance(value, str):
        return [7, [value]]
    if isinstance(value, list):
        return ["x", {"a": 1}]
    if isinstance(value, dict):
        return ["x", [1]]
    return ["x", [1]]  # null


def _safetensors_header(data: bytes) -> tuple[dict, int]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), length


def _with_header(data: bytes, header: dict, length: int) -> bytes:
    """The file with a new header of the same byte length (padded with spaces, as safetensors allows)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length :]


def _mutations(name: str, data: bytes) -> list[tuple[str, bytes, bool, str | None]]:
    """(description, new bytes, whether keel must reject it, what its error must name besides the file)."""
    sizes = sorted({0, 1, 7, len(data) // 2, len(data.rstrip()) - 1})  # a trailing newline is not content
    out = [(f"truncated to {n} bytes", data[:n], True, None) for n in sizes]
    out.append(("garbage prefix", b"\xff\xfe\x00garbage" + data[11:], True, None))
    if name.endswith(".safetensors"):
        header, length = _safetensors_header(data)
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        out[-2] = (*out[-2][:3], last)  # cut in the last tensor's data: that tensor is named
        out.append(("header length too large", struct.pack("<Q", length + 64) + data[8:], True, None))
        out.append(("header bytes corrupted", data[:8] + b"{\x00\xff" + data[11:], True, None))
        # No checksum: flipped weight bytes are undetectable (keel may accept them, but must not crash).
        out.append(("data bytes flipped", data[:-16] + bytes(b ^ 0xFF for b in data[-16:]), False, None))
        tensor = next(k for k in header if k != "__metadata__")
        for field, value in [("dtype", "I32"), ("dtype", "F16"), ("dtype", "XX"), ("shape", [3, 5]),
                             ("shape", "x"), ("data_offsets", [0, 4])]:
            changed = json.loads(json.dumps(header))
            changed[tensor][field] = value
            out.append((f"tensor {tensor} {field} -> {value!r}", _with_header(data, changed, length), True, tensor))
        return out
    content = json.loads(data)
    out.append(("a JSON list instead of an object", b"[1, 2]", True, None))
    if name == INDEX_FILE:
        weights = content["weight_map"]
        first = next(iter(weights))
        other = next(v for v in weights.values() if v != weights[first])
        for desc, changed, named in [
            ("weight_map -> list", {**content, "weight_map": [1]}, "weight_map"),
            ("no weight_map", {k: v for k, v in content.items() if k != "weight_map"}, "weight_map"),
            (f"{first} -> 5", {**content, "weight_map": {**weights, first: 5}}, first),
            (f"{first} -> a missing shard", {**content, "weight_map": {**weights, first: "nope.safetensors"}}, first),
            (f"{first} -> another shard", {**content, "weight_map": {**weights, first: other}}, first),
        ]:
            out.append((desc, json.dumps(changed).encode(), True, named))
        return out
    for key, value in content.items():
        for new in _retyped(value):
            required = name == "config.json" and key in REQUIRED_FIELDS
            out.append((f"field {key}: {value!r} -> {new!r}", json.dumps({**content, key: new}).encode(), required,
                        key))
    return out


def test_every_checkpoint_file_mutation_is_a_checkpoint_error_naming_the_file(pristine, tmp_path):
    names = _files(pristine)
    assert {"config.json", INDEX_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE} <= set(names)
    assert sum(n.endswith(".safetensors") for n in names) >= 3
    work = tmp_path / "ckpt"
    shutil.copytree(pristine, work)
    escaped, unnamed, accepted, rejected = [], [], [], 0
    for name in names:
        original = (pristine / name).read_bytes()
        for desc, data, must_fail, named in _mutations(name, original):
            (work / name).write_bytes(data)
            # load_model reads config.json and the weights; check_checkpoint every file.
            readers = [check_checkpoint]
            if name.endswith(".safetensors") or name in (INDEX_FILE, "config.json"):
                readers.append(load_model)
            for read in readers:
                try:
                    read(work)
                except CheckpointError as err:
                    rejected += 1
                    message = str(err)
                    if not message.startswith(str(work / name)) or (named is not None and named not in message):
                        unnamed.append((name, desc, read.__name__, message))
                except Exception as err:  # noqa: BLE001 - what the test is looking for
                    escaped.append((name, desc, read.__name__, f"{type(err).__name__}: {err}"[:300]))
                else:
                    if must_fail:
                        accepted.append((name, desc, read.__name__))
        (work / name).write_bytes(original)
    assert not escaped, "\n".join(map(str, escaped))
    assert not unnamed, "\n".join(map(str, unnamed))
    assert not accepted, "\n".join(map(str, accepted))
    assert rejected > 300  # the mutations are not vacuous
