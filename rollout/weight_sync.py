"""Moving the trainer's weights into the rollout engines (CPU path: shared memory).

The trainer calls `publish_weights(model.state_dict(), version)`: the tensors (HF `deepseek_v32`
checkpoint names, per-expert tensors included) are written once to a safetensors file under
/dev/shm, and the returned `WeightHandle` (a path and the names/shapes) is all that crosses Ray.
Each worker checks the handle against its checkpoint's names and shapes and hands the path to
its engine, which reads the file memory-mapped. vLLM's engine-to-worker rpc cannot carry tensors
by value ("cannot pickle memoryview objects"), so a path is also what the engine needs.

Workers on other nodes cannot see this node's /dev/shm; that case is not implemented.
The CUDA path (NCCL broadcast through vLLM's weight-transfer engine) lives in `worker.py`.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass(frozen=True)
class WeightHandle:
    """Where a published weight version lives, and what it holds."""

    path: str
    version: int
    host: str
    shapes: dict[str, tuple[int, ...]] = field(repr=False)


def publish_weights(
    named_tensors: dict[str, torch.Tensor], version: int, directory: str | None = None
) -> WeightHandle:
    """Write `named_tensors` to one safetensors file in shared memory; returns its handle."""
    if not named_tensors:
        raise ValueError("publish_weights got no tensors")
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in named_tensors.items()}
    folder = Path(directory or tempfile.mkdtemp(prefix="keel-weights-", dir=_SHM))
    path = folder / f"v{version}-{uuid.uuid4().hex[:8]}.safetensors"
    save_file(tensors, str(path))
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    return WeightHandle(path=str(path), version=version, host=socket.gethostname(), shapes=shapes)


def release_weights(handle: WeightHandle) -> None:
    """Delete a published version's file (and its folder once empty)."""
    path = Path(handle.path)
    path.unlink(missing_ok=True)
    if path.parent.name.startswith("keel-weights-") and not any(path.parent.iterdir()):
        shutil.rmtree(path.parent, ignore_errors=True)


def checkpoint_shapes(checkpoint_dir: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a checkpoint's safetensors files (headers only)."""
    shapes = {}
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {checkpoint_dir}")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def check_weights(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """A weight update must name exactly the checkpoint's tensors, each with its shape."""
    unknown = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    wrong = sorted(n for n in set(shapes) & set(expected) if tuple(shapes[n]) != tuple(expected[n]))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} names not in the checkpoint (e.g. {unknown[:3]})")
    if missing:
        problems.append(f"{len(missing)} checkpoint tensors missing (e.g. {missing[:3]})")
    if wrong:
        n = wrong[0]
        problems.append(
            f"{len(wrong)} tensors with the wrong shape (e.g. {n}: got {tuple(shapes[n])}, "
            f"expected {tuple(expected[n])})"
        )
    if problems:
        raise ValueError("weight update does not fit the served model: " + "; ".join(problems))
