"""The driver's view of the rollout workers: one call samples a batch across all of them.

`generate` splits the prompts into one contiguous share per worker and concatenates the returned
RolloutBatches in prompt order. Workers are Ray actors with `max_restarts`. A worker fails when its
process dies (Ray restarts it), when its engine dies under it (`liveness.EngineDied`: vLLM's engine core
in its own process was killed) or when a call outlives its deadline (`liveness.call_deadline`: a hung
engine); the client kills the worker in the last two cases so that Ray restarts it. The restarted worker
(from the original checkpoint) gets the latest weights again and its share is re-issued. A share's result
arrives whole or not at all, so every sample is returned exactly once. A worker that fails more than
`max_restarts` times stops the run with `liveness.RolloutWorkerFailed`, naming it and the cause.

Weights (CPU): the publisher (trainer rank 0) serializes each version once and the client sends every
worker its handle (`load_weights`); the bytes never pass through this process. The `weight_transport`
engine setting picks how the bytes travel (`transport_plan(publisher_node)`, `rollout.weight_sync`): a
/dev/shm file for workers on the publisher's Ray node, Ray's object store for workers elsewhere ("auto",
the default), the file only ("shm") or the object store only ("object_store"). Worker nodes are asked
once at start-up and again when a worker restarts (it may come back on another node, and then gets the
latest handle with a blob added). `update_weights(tensors, version)` publishes from this process instead
(tests and benchmarks); `load_checkpoint` points the workers at a keel checkpoint's own file (recipes).

Weights (CUDA; written against vLLM 0.32, not yet run on a GPU): trainer rank 0 broadcasts over NCCL through
vLLM's weight-transfer engine (`weight_sync.NcclWeightSender`) and drives the workers' side through
`weight_sync_client()`; `weight_sync_world_size()` is the NCCL group's size. With `sleep_while_training` the
driver puts the engines to sleep around the trainer's step (`sleep`, `wake_up`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout import serving, weight_sync
from rollout.config import EngineConfig
from rollout.liveness import EngineDied, RolloutWorkerFailed, call_deadline
from rollout.worker import RolloutWorker, check_sampling


class RolloutClient:
    def __init__(
        self,
        checkpoint_dir: str,
        num_workers: int,
        engine: EngineConfig | dict,
        ray_options: dict | None = None,
        max_restarts: int = 3,
        timeout_s: float = 300.0,
        timeout_per_token_s: float = 0.5,
        placement: tuple[PlacementGroup, list[int]] | None = None,
    ) -> None:
        """max_restarts: failures a worker may have in the client's life; timeout_s, timeout_per_token_s: a call's
        deadline (`liveness.call_deadline`). placement: a ready placement group and each worker's bundle in it
        (rl.loop.placement.reserve); None: Ray places the workers."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        cuda = serving.on_cuda()
        self.facts = serving.model_facts(checkpoint_dir)
        self.expected_weights = weight_sync.checkpoint_shapes(checkpoint_dir)
        self.engine = EngineConfig.of(engine)
        self.weight_transport = self.engine.weight_transport
        if self.weight_transport not in weight_sync.TRANSPORTS:
            raise ValueError(
                f"engine.weight_transport must be one of {weight_sync.TRANSPORTS}, got {self.weight_transport!r}"
            )
        # vLLM sizes its own CPU threads, so on CPU an actor reserves no Ray CPU slot.
        default = {"num_gpus": self.engine.tensor_parallel_size} if cuda else {"num_cpus": 0}
        options = {**default, **(ray_options or {}), "max_restarts": max_restarts, "max_task_retries": 0}
        actor = ray.remote(RolloutWorker)
        self.needs: list[dict[str, float]] = [{}] * num_workers  # what a worker's node must have (its bundle)
        if placement is not None:
            pg, bundles = placement
            self.needs = [pg.bundle_specs[b] for b in bundles]
            self.workers = [actor.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=b)).remote(checkpoint_dir, self.engine) for b in bundles]
        else:
            self.workers = [actor.options(**options).remote(checkpoint_dir, self.engine) for _ in range(num_workers)]
        self.cuda = cuda
        self.version = 0
        self.handle: weight_sync.WeightHandle | None = None  # latest weights the workers loaded (CPU)
        self.published: weight_sync.WeightHandle | None = None  # the latest version update_weights published here
        self.reissued = 0  # shares re-run after a worker died
        self.max_restarts, self.timeout_s, self.timeout_per_token_s = max_restarts, timeout_s, timeout_per_token_s
        self.restarts = [0] * num_workers  # failures per worker so far
        self.last_update: list[dict] = []  # per worker: what its latest weight load read, and from where
        states = ray.get([w.ping.remote() for w in self.workers])
        self.worker_nodes = [s["node_id"] for s in states]
        self.worker_pids = [(s["node_id"], s["pid"]) for s in states]  # a restarted worker answers from another

    def generate(
        self, prompts: list[list[int]], sampling: dict, policy_version: int, prompt_indices: list[int] | None = None
    ) -> pa.RecordBatch:
        """G = sampling["n"] rows per prompt, in prompt order; the signature is RolloutWorker.generate's.

        prompt_indices: each prompt's `prompt_index` (its GRPO group; it also seeds its samples), default its
        position in `prompts`.
        """
        s = check_sampling(sampling, self.facts.vocab_size, self.engine.max_logprobs, kept_from_engine=not self.cuda)
        for p in prompts:
            serving.check_request(p, s["max_tokens"], self.facts, self.engine.max_model_len, self.cuda)
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(indices) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(indices)} prompt_indices")
        shares = [a.tolist() for a in np.array_split(np.arange(len(prompts)), len(self.workers)) if len(a)]
        calls = [
            (i, "generate", ([prompts[j] for j in idx], sampling, policy_version, [indices[j] for j in idx]))
            for i, idx in enumerate(shares)
        ]
        batches = self._run(calls)
        return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]

    def transport_plan(self, publisher_node: str | None) -> tuple[bool, bool]:
        """(file, blob) a publisher on `publisher_node` should write for this client's workers."""
        return weight_sync.plan_transport(self.weight_transport, publisher_node, self.worker_nodes)

    def load_weights(self, handle: weight_sync.WeightHandle) -> None:
        """Every worker loads a published version (`handle.version`); returns when all have.

        A handle without a blob gets one (made on the publisher's node) when some worker cannot see its file.
        """
        self._check_cpu()
        weight_sync.check_weights(handle.shapes, self.expected_weights)
        self.handle, self.version = self._reachable(handle), handle.version
        self.last_update = self._run([(i, "update_weights", None) for i in range(len(self.workers))])

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> None:
        """Publish tensors (HF deepseek_v32 names) from this process and load them into every worker (tests
        and benchmarks; a training run's weights are published by trainer rank 0 and loaded with
        `load_weights`). The version published before is released once this one is loaded."""
        self._check_cpu()
        weight_sync.check_weights({n: tuple(t.shape) for n, t in named_tensors.items()}, self.expected_weights)
        node = weight_sync.current_node()
        file, blob = self.transport_plan(node)
        previous, self.published = self.published, weight_sync.publish_weights(
            named_tensors, version, file=file, blob=blob, node=node)
        try:
            self.load_weights(self.published)
        finally:
            if previous is not None:
                weight_sync.release_weights(previous)
            del previous  # the old version's object-store ref (if any) goes with it

    def load_checkpoint(self, checkpoint_dir: str | Path, version: int) -> None:
        """Every worker loads a keel checkpoint's weights, read from its model.safetensors in place (this
        node's, or through the object store on another node; `weight_sync.checkpoint_handle`)."""
        self.load_weights(weight_sync.checkpoint_handle(checkpoint_dir, version, node=weight_sync.current_node()))

    def _check_cpu(self) -> None:
        if self.cuda:
            raise NotImplementedError(
                "on CUDA the weights travel over NCCL from trainer rank 0 (weight_sync.NcclWeightSender driving "
                "weight_sync_client(); rl.loop.step.sync_weights), not as a published file"
            )

    def _reachable(self, handle: weight_sync.WeightHandle) -> weight_sync.WeightHandle:
        """The handle, with a blob attached when the plan for its publisher's node wants one it lacks."""
        _, blob = self.transport_plan(handle.node)
        return weight_sync.attach_blob(handle) if blob and handle.blob is None else handle

    def weight_sync_client(self) -> WorkerWeightSyncClient:
        """CUDA: the `VLLMWeightSyncClient` that vLLM's trainer-side NCCL engine drives (it crosses Ray to
        trainer rank 0: it holds only the workers' actor handles)."""
        if not self.cuda:
            raise NotImplementedError("the NCCL weight-transfer path needs CUDA; on CPU use load_weights")
        return WorkerWeightSyncClient(self.workers, self.engine.tensor_parallel_size)

    def weight_sync_world_size(self) -> int:
        """Size of the NCCL weight-sync group: trainer rank 0 and every worker's engine ranks."""
        return 1 + len(self.workers) * self.engine.tensor_parallel_size

    def weights_synced(self, version: int) -> None:
        """Record that every worker now serves `version` (CUDA: after trainer rank 0's NCCL update)."""
        self.version = version

    @property
    def sleeps(self) -> bool:
        """Whether the driver puts the engines to sleep while the trainer steps (`sleep_while_training`)."""
        return self.cuda and self.engine.sleep_while_training

    def sleep(self) -> None:
        """CUDA: every engine frees its GPU memory (weights to CPU, KV cache dropped); untested on GPU."""
        ray.get([w.sleep.remote() for w in self.workers])

    def wake_up(self, tags: list[str] | None = None) -> None:
        """CUDA: every engine reallocates `tags` ("weights", "kv_cache"; all when None)."""
        ray.get([w.wake_up.remote(tags) for w in self.workers])

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every worker. Each first shuts down its engine and removes its serving view (a killed
        actor runs no exit handlers), then is killed; a worker that does not answer is killed anyway
        and its view is left for the next view on the host to sweep (`serving.remove_stale_views`)."""
        if self.workers:
            refs = [w.shutdown.remote() for w in self.workers]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        self.handle = None  # drops the object-store ref too
        if self.published is not None:
            weight_sync.release_weights(self.published)
            self.published = None

    def _run(self, calls: list[tuple[int, str, tuple | None]]) -> list:
        """Run (worker, method, args) calls; results in call order; re-issue calls whose worker failed.

        An "update_weights" call takes no args: it always sends the latest handle and version, and one
        whose worker failed is not re-issued when `_recover` already brought the restarted worker to them.
        """
        results: list = [None] * len(calls)
        pending = {self._submit(*call): (k, time.monotonic() + self._deadline(*call)) for k, call in enumerate(calls)}
        while pending:
            first = min(due for _, due in pending.values())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(first - time.monotonic(), 0.0))
            kill = False
            if done:
                k, _ = pending.pop(done[0])
                try:
                    results[k] = ray.get(done[0])
                    continue
                except ray.exceptions.RayActorError as err:  # the process died; Ray restarts it
                    cause = str(err).strip().splitlines()[0]
                except EngineDied as err:  # the engine died under a live worker
                    cause, kill = str(getattr(err, "cause", err)), True
            else:
                ref = min(pending, key=lambda r: pending[r][1])
                k, _ = pending.pop(ref)
                cause, kill = f"no answer to {calls[k][1]} within {self._deadline(*calls[k]):.0f} s", True
            worker, method, _ = calls[k]
            loaded = self._restart(worker, cause, kill)
            if method == "update_weights" and loaded is not None:
                results[k] = loaded
                continue
            self.reissued += 1
            pending[self._submit(*calls[k])] = (k, time.monotonic() + self._deadline(*calls[k]))
        return results

    def _deadline(self, worker: int, method: str, args: tuple | None) -> float:
        """Seconds the call may take (`liveness.call_deadline`): generate's scale with its decode steps."""
        if method != "generate":
            return call_deadline(self.timeout_s, 0.0, 0, 1, 1)
        prompts, sampling = args[0], args[1]
        return call_deadline(self.timeout_s, self.timeout_per_token_s, sampling.get("max_tokens", 16),
                             len(prompts) * sampling.get("n", 1), self.engine.max_num_seqs)

    def _restart(self, worker: int, cause: str, kill: bool) -> dict | None:
        """Count a failure of `worker` (RolloutWorkerFailed past max_restarts), kill it if it still runs, wait for
        Ray to restart it and bring it to the latest weights (`_recover`)."""
        self.restarts[worker] += 1
        if self.restarts[worker] > self.max_restarts:
            raise RolloutWorkerFailed(f"rollout worker {worker} failed {self.restarts[worker]} times, more than "
                                      f"rollout.max_restarts={self.max_restarts}; last cause: {cause}")
        print(f"keel: rollout worker {worker}: {cause}; restarting it ({self.restarts[worker]} of "
              f"rollout.max_restarts={self.max_restarts}) and re-issuing its share", file=sys.stderr, flush=True)
        if kill:
            ray.kill(self.workers[worker], no_restart=False)
        try:
            return self._recover(worker)  # its own bound: a restart builds an engine (minutes for a large model)
        except (ray.exceptions.RayError, TimeoutError) as err:
            raise RolloutWorkerFailed(f"rollout worker {worker} did not come back after a restart ({cause}): "
                                      f"{str(err).strip().splitlines()[0]}") from err

    def _submit(self, worker: int, method: str, args: tuple | None) -> ray.ObjectRef:
        if method == "update_weights":
            args = (self.handle, self.version)
        return getattr(self.workers[worker], method).remote(*args)

    def _recover(self, worker: int, timeout_s: float = 600.0) -> dict | None:
        """Wait for Ray to restart a dead worker, then bring it to the latest weights (its update's result)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_node(worker)
            try:  # a short wait per ping, so that a lost node is seen while Ray is still restarting the worker
                state = ray.get(self.workers[worker].ping.remote(), timeout=min(max(deadline - time.monotonic(), 1.0),
                                                                                5.0))
                if (state["node_id"], state["pid"]) != self.worker_pids[worker]:
                    break  # not the old process (ray.kill takes a moment), which would still answer
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout worker {worker} was not restarted within {timeout_s:.0f} s")
            time.sleep(0.5)
        self.worker_nodes[worker] = state["node_id"]
        self.worker_pids[worker] = (state["node_id"], state["pid"])
        if self.cuda and state["version"] != self.version:
            raise RuntimeError(
                f"rollout worker {worker} was restarted with the checkpoint's weights (version {state['version']}, "
                f"the others serve {self.version}); on CUDA a restarted worker cannot rejoin the NCCL weight-sync "
                "group yet, so it would sample from stale weights"
            )
        if self.handle is None or state["version"] == self.version:
            return None
        # Restarted on another node than the publisher's: the /dev/shm file is out of its reach.
        self.handle = self._reachable(self.handle)
        result = ray.get(self.workers[worker].update_weights.remote(self.handle, self.version), timeout=timeout_s)
        if worker < len(self.last_update):
            self.last_update[worker] = result
        return result


    def _check_node(self, worker: int) -> None:
        """RolloutWorkerFailed when the worker's Ray node is gone and no alive node can hold it again; otherwise
        Ray restarts it (on a surviving node if its own is gone)."""
        problem = lost_node(ray.nodes(), self.worker_nodes[worker], self.needs[worker])
        if problem:
            raise RolloutWorkerFailed(f"rollout worker {worker}'s {problem}")


def lost_node(nodes: list[dict], node_id: str | None, need: dict[str, float]) -> str | None:
    """What to say when `node_id` is dead among `nodes` (ray.nodes()) and no alive node has the resources `need`
    (a worker's placement-group bundle, e.g. {"keel_rollout": 0.001}); None while the worker can come back."""
    lost = next((n for n in nodes if n["NodeID"] == node_id and not n["Alive"]), None)
    if lost is None or any(n["Alive"] and all(n["Resources"].get(k, 0.0) >= v for k, v in need.items())
                           for n in nodes):
        return None
    return (f"Ray node {lost['NodeID']} ({lost['NodeManagerAddress']}) was lost, and no alive node has what the "
            f"worker needs ({need}): start a node with those resources (or bring that one back) and resume the "
            "run from its last checkpoint")


class WorkerWeightSyncClient:
    """vLLM's four-method weight-sync protocol (`VLLMWeightSyncClient`), fanned out to every rollout worker.

    Held by trainer rank 0's `weight_sync.NcclWeightSender`. vLLM's trainer engine sends every worker the same
    init info (rank_offset 1); each separate engine numbers its ranks from 0, so worker i is given its own offset
    (`weight_sync.worker_rank_offsets`). `version`: set by the sender before an update; the workers take it as
    their weights' version at `finish_weight_update`. CUDA only; not yet run on a GPU.
    """

    def __init__(self, workers: list, ranks_per_worker: int = 1) -> None:
        self.workers = workers
        self.offsets = weight_sync.worker_rank_offsets(len(workers), ranks_per_worker)
        self.version: int | None = None

    def _all(self, method: str, payload: dict | None = None) -> None:
        ray.get([w.weight_sync_call.remote(method, payload) for w in self.workers])

    def init_payloads(self, init_info: dict) -> list[dict]:
        """Each worker's init info: vLLM's, with the worker's own rank offset."""
        if init_info.get("rank_offset") != 1:
            raise ValueError(f"expected vLLM's single-sender init info (rank_offset 1), got {init_info}")
        return [{**init_info, "rank_offset": offset} for offset in self.offsets]

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        payloads = self.init_payloads(init_info)
        ray.get([w.weight_sync_call.remote("init_weight_transfer_engine", p)
                 for w, p in zip(self.workers, payloads, strict=True)])

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._all("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        ray.get([w.weight_sync_call.remote("finish_weight_update", None, version) for w in self.workers])
