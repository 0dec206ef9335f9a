"""Moving the trainer's weights into the rollout engines (CPU path: shared memory or Ray's object store).

This module is the contract between the publisher and the receivers. The publisher is trainer rank 0
(`trainer.worker.TrainerWorker.publish_weights`; tests and benches may publish from the driver through
`RolloutClient.update_weights`): `publish_weights(named_tensors, version, ...)` serializes the tensors (HF
`deepseek_v32` checkpoint names, per-expert tensors included) once, in safetensors format, and the returned
`WeightHandle` (the names/shapes, where the bytes are, the publisher's Ray node) is all that crosses Ray: the
driver passes it from the trainer to `RolloutClient.load_weights` and never holds the bytes. Each worker
checks the handle against its checkpoint's names and shapes and hands its engine the path of a safetensors
file, which the engine reads memory-mapped. vLLM's engine-to-worker rpc cannot carry tensors by value
("cannot pickle memoryview objects"), so a path on the engine's node is what the engine needs.

Two transports carry the bytes, chosen per client by the `weight_transport` setting (`plan_transport`,
comparing each worker's Ray node with the publisher's):
  shm           one file under the publisher's /dev/shm (`handle.path`). Workers on the publisher's node read
                it directly; workers on other nodes cannot see it.
  object_store  the same bytes put once into Ray's object store (`handle.blob`, an ObjectRef nested in the
                handle, so Ray hands it over unresolved). A worker that cannot see `handle.path` fetches it
                with `ray.get`, writes it to a temp file under its own node's /dev/shm, loads that and
                removes it (`weights_file`). The publisher drops the ref when it publishes the next version
                and at shutdown, and Ray frees the object once no worker still borrows it.
  auto          (the default) the file for workers on the publisher's node, plus the blob only when some
                worker runs on another Ray node (node ids asked once at start-up and again after a restart;
                a worker that moves gets a blob made from the file by a task on the publisher's node,
                `attach_blob`).
A keel checkpoint's own model.safetensors can stand in for a published file (`checkpoint_handle`): the
recipes switch an engine between finished models that way.

The CUDA path (`NcclWeightSender`, written against vLLM 0.32's weight-transfer API, not yet run on a GPU): trainer
rank 0 holds vLLM's `NCCLTrainerWeightTransferEngine`, joined in one NCCL group with every rollout worker's engine
ranks (worker i's ranks start at `worker_rank_offsets`), and drives vLLM's four-call handshake through
`rollout.client.WorkerWeightSyncClient`. The weights stream as a `BucketStream`: the same HF names as the CPU
path, cast to the engine's dtype one bucket at a time (at most `bucket_bytes` of fp32 per bucket; the same
size is vLLM's packed-broadcast buffer), so the trainer never holds a second copy of the whole model; under
ZeRO-3 each bucket is gathered as it goes, every trainer rank taking part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from rollout.serving import process_alive

_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()

TRANSPORTS = ("auto", "shm", "object_store")
RECEIVED_PREFIX = "keel-weights-recv-"  # a worker's local copy of an object-store blob (removed after loading)


@dataclass(frozen=True)
class WeightHandle:
    """Where a published weight version lives, and what it holds.

    path: the safetensors file on the publishing host ("" when only the object store carries the bytes).
    blob: a Ray ObjectRef to the same bytes (a uint8 array), or None. Nested in the handle, so passing the
    handle to an actor method does not make Ray fetch the bytes; only a worker that needs them does.
    node: the publisher's Ray node id (None outside Ray): the transport plan compares workers' nodes with it.
    owned: whether `release_weights` deletes the file (False for a checkpoint's own file, `checkpoint_handle`).
    """

    path: str
    version: int
    host: str
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    blob: Any = field(default=None, repr=False, compare=False)
    node: str | None = None
    owned: bool = True


def current_node() -> str | None:
    """This process's Ray node id, None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def plan_transport(setting: str, publisher_node: str | None, worker_nodes: Sequence[str | None]) -> tuple[bool, bool]:
    """(write the /dev/shm file, put the bytes in the object store) for a `weight_transport` setting.

    "shm": the file only; "object_store": the blob only (even on one node); "auto": the file when some
    worker shares the publisher's Ray node, the blob when some worker does not.
    """
    if setting not in TRANSPORTS:
        raise ValueError(f"weight_transport must be one of {TRANSPORTS}, got {setting!r}")
    if setting == "shm":
        return True, False
    if setting == "object_store":
        return False, True
    if not worker_nodes:
        raise ValueError("plan_transport needs the node of at least one worker")
    return any(n == publisher_node for n in worker_nodes), any(n != publisher_node for n in worker_nodes)


def publish_weights(
    named_tensors: dict[str, torch.Tensor],
    version: int,
    directory: str | None = None,
    file: bool = True,
    blob: bool = False,
    node: str | None = None,
) -> WeightHandle:
    """Serialize `named_tensors` once: to a safetensors file in shared memory (`file`) and/or into Ray's
    object store (`blob`, needs a connected Ray); returns the handle. `node`: this process's Ray node
    (`current_node()`), recorded in the handle for the transport plan."""
    if not named_tensors:
        raise ValueError("publish_weights got no tensors")
    if not (file or blob):
        raise ValueError("publish_weights needs a file, a blob or both")
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in named_tensors.items()}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    path, ref = "", None
    if file:
        folder = Path(directory or tempfile.mkdtemp(prefix="keel-weights-", dir=_SHM))
        folder.mkdir(parents=True, exist_ok=True)
        path = str(folder / f"v{version}-{uuid.uuid4().hex[:8]}.safetensors")
    if blob:
        import ray

        data = save(tensors)
        if file:
            Path(path).write_bytes(data)
        ref = ray.put(np.frombuffer(data, dtype=np.uint8))
        del data
    else:
        save_file(tensors, path)
    return WeightHandle(path=path, version=version, host=socket.gethostname(), shapes=shapes, blob=ref, node=node)


def checkpoint_handle(checkpoint_dir: str | Path, version: int, node: str | None = None) -> WeightHandle:
    """A handle on a keel checkpoint's own model.safetensors (read in place, never deleted by
    `release_weights`); `node`: a Ray node that sees the file. Sharded checkpoints have no single file."""
    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"{checkpoint_dir}: no single model.safetensors to load in place (a sharded checkpoint); "
                         "publish its tensors with RolloutClient.update_weights instead")
    return WeightHandle(path=str(path.resolve()), version=version, host=socket.gethostname(),
                        shapes=checkpoint_shapes(str(checkpoint_dir)), node=node, owned=False)


def _read_bytes(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def attach_blob(handle: WeightHandle) -> WeightHandle:
    """The handle with its file's bytes also in the object store, for a worker on another node than the
    publisher's. A zero-CPU Ray task on the publisher's node reads the file, so the bytes go from that node's
    /dev/shm to its object store and never through the calling process; the caller owns the returned ref."""
    if handle.blob is not None:
        return handle
    if not handle.path:
        raise ValueError(f"weight version {handle.version} has neither a file nor a blob")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": 0, "max_retries": 0}
    if handle.node is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(handle.node, soft=False)
    return dataclasses.replace(handle, blob=ray.remote(_read_bytes).options(**options).remote(handle.path))


def release_weights(handle: WeightHandle) -> None:
    """Delete a published version's file (and its folder once empty). Its blob is freed by Ray once the
    caller drops the handle (and no worker still borrows the ref). A checkpoint's own file is left alone."""
    if not handle.path or not handle.owned:
        return
    path = Path(handle.path)
    path.unlink(missing_ok=True)
    if path.parent.name.startswith("keel-weights-") and not any(path.parent.iterdir()):
        shutil.rmtree(path.parent, ignore_errors=True)


def fetch_blob(blob: Any) -> np.ndarray:
    """The bytes behind a handle's blob (a Ray ObjectRef): a uint8 array, read-only."""
    import ray

    return ray.get(blob)


@contextlib.contextmanager
def weights_file(handle: WeightHandle, directory: str | None = None) -> Iterator[tuple[str, str]]:
    """(path, source) of a safetensors file this process can read the handle's tensors from.

    source "file": the published file, visible here (same node). source "object_store": the blob, fetched
    and written to a temp file under this node's /dev/shm (or `directory`), removed when the block exits,
    whether the load succeeded or not. Neither visible file nor blob: FileNotFoundError.
    """
    if handle.path and os.path.exists(handle.path):
        yield handle.path, "file"
        return
    if handle.blob is None:
        where = f"weight file {handle.path}" if handle.path else "weight version without a file"
        raise FileNotFoundError(
            f"{where} (published on host {handle.host}, version {handle.version}) is not visible to this "
            f"worker on host {socket.gethostname()}, and the handle carries no object-store copy; shared-memory "
            "weight sync needs trainer and workers on one node: set the rollout engine setting "
            "weight_transport='object_store' (or 'auto') to ship weights through Ray's object store"
        )
    folder = directory or _SHM
    remove_stale_copies(folder)
    prefix = f"{RECEIVED_PREFIX}{socket.gethostname()}-{os.getpid()}-v{handle.version}-"
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            data = fetch_blob(handle.blob)
            f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            del data  # unpin the object-store buffer before the engine reads the copy
        yield path, "object_store"
    finally:
        Path(path).unlink(missing_ok=True)


def remove_stale_copies(folder: str) -> list[str]:
    """Remove received copies under `folder` left by processes on this host that are gone (a worker killed
    while loading runs no cleanup); returns them."""
    removed = []
    host = socket.gethostname()
    for entry in Path(folder).glob(f"{RECEIVED_PREFIX}{host}-*"):
        pid = entry.name[len(RECEIVED_PREFIX) + len(host) + 1 :].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        entry.unlink(missing_ok=True)
        removed.append(str(entry))
    return removed


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


# ---- CUDA: NCCL through vLLM's weight-transfer engine -------------------------------------------------------

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def wire_dtype(engine_dtype: str) -> torch.dtype:
    """The dtype the trainer sends in: the rollout engine's (`EngineConfig.dtype`), named explicitly."""
    if engine_dtype not in WIRE_DTYPES:
        raise ValueError(f"CUDA weight sync casts to the engine dtype, which must be one of {sorted(WIRE_DTYPES)} "
                         f"(not 'auto'), got {engine_dtype!r}")
    return WIRE_DTYPES[engine_dtype]


def worker_rank_offsets(num_workers: int, ranks_per_worker: int) -> list[int]:
    """Each rollout worker's first rank in the NCCL weight-sync group: rank 0 is trainer rank 0, then each worker's
    engine ranks (tensor parallel) in turn. vLLM numbers an engine's ranks from its `rank_offset` by its own
    data-parallel index, which is 0 in every separate `LLM`, so each worker needs its own offset."""
    return [1 + i * ranks_per_worker for i in range(num_workers)]


class BucketStream:
    """The trainer's weights as vLLM's trainer engine reads a `WeightSource`: `metadata()` (name, wire dtype,
    shape, in stream order) and a fresh pass per iteration, casting one bucket at a time to the wire dtype.

    `shapes()`: [(HF name, shape)] in stream order, read without materializing any weight; `buckets()`: a fresh
    pass of [(name, tensor)] lists in that order, one bucket alive at a time (trainer.sharding.weight_stream:
    under ZeRO-3 each bucket is gathered while every other trainer rank iterates along). Duck-typed: vLLM's
    engine only calls `metadata` and `__iter__`.
    """

    def __init__(self, shapes: Callable[[], list[tuple[str, tuple[int, ...]]]],
                 buckets: Callable[[], Iterator[list[tuple[str, torch.Tensor]]]], dtype: torch.dtype):
        self.shapes, self.buckets, self.dtype = shapes, buckets, dtype

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, self.dtype, tuple(shape)) for n, shape in self.shapes()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets():
            cast = [(n, t.detach().to(self.dtype).contiguous()) for n, t in bucket]
            yield from cast
            del cast


class NcclWeightSender:
    """Trainer rank 0's end of CUDA weight sync: vLLM's `NCCLTrainerWeightTransferEngine` over a `BucketStream`.

    `client`: a `rollout.client.WorkerWeightSyncClient` (Ray handles of every rollout worker); `world_size`: 1 +
    every worker's engine ranks. Opening it joins the NCCL group (the workers join at the same time, through the
    client); `send(version)` runs one update: start, broadcast while the workers receive, finish.
    Needs CUDA and vLLM's CUDA build; written against vLLM 0.32's API and not yet run on a GPU.
    """

    def __init__(self, client: Any, stream: BucketStream, bucket_bytes: int, world_size: int) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("NCCL weight sync needs CUDA on trainer rank 0; on CPU the trainer publishes a "
                               "safetensors file (publish_weights)")
        import ray
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        self.client, self.stream = client, stream
        with socket.socket() as s:  # the group's rendezvous: this process's node, a free port
            s.bind(("", 0))
            master_port = s.getsockname()[1]
        master_address = ray.util.get_node_ip_address()
        info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size,
                                   rank=0, packed=True, packed_buffer_size_bytes=bucket_bytes)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=self.stream)

    def send(self, version: int) -> None:
        self.client.version = version  # the workers record it at finish_weight_update
        self.engine.send_weights()

    def shutdown(self) -> None:
        self.engine.shutdown()
