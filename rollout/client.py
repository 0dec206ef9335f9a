"""The driver's view of the rollout workers: one call samples a batch across all of them.

`generate` splits the prompts into one contiguous share per worker and concatenates the returned
RolloutBatches in prompt order. Workers are Ray actors with `max_restarts`: when one dies, Ray
restarts it (from the original checkpoint), the client pushes it the latest weights again and
re-issues its share. A share's result arrives whole or not at all, so every sample is returned
exactly once.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import ray
import torch

from rollout import serving, weight_sync
from rollout.worker import ENGINE_DEFAULTS, RolloutWorker, check_sampling


class RolloutClient:
    def __init__(
        self,
        checkpoint_dir: str,
        num_workers: int,
        engine: dict,
        ray_options: dict | None = None,
        max_restarts: int = 3,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        cuda = serving.on_cuda()
        self.facts = serving.model_facts(checkpoint_dir)
        self.expected_weights = weight_sync.checkpoint_shapes(checkpoint_dir)
        self.engine = {**ENGINE_DEFAULTS, **engine}
        # vLLM sizes its own CPU threads, so on CPU an actor reserves no Ray CPU slot.
        default = {"num_gpus": self.engine["tensor_parallel_size"]} if cuda else {"num_cpus": 0}
        options = {**default, **(ray_options or {}), "max_restarts": max_restarts, "max_task_retries": 0}
        actor = ray.remote(RolloutWorker).options(**options)
        self.workers = [actor.remote(checkpoint_dir, engine) for _ in range(num_workers)]
        self.cuda = cuda
        self.version = 0
        self.handle: weight_sync.WeightHandle | None = None  # latest published weights (CPU)
        self.reissued = 0  # shares re-run after a worker died
        ray.get([w.ping.remote() for w in self.workers])

    def generate(self, prompts: list[list[int]], sampling: dict, policy_version: int) -> pa.RecordBatch:
        """G = sampling["n"] rows per prompt, in prompt order; prompt_index = position in `prompts`."""
        s = check_sampling(sampling, self.facts.vocab_size, self.engine["max_logprobs"], kept_from_engine=not self.cuda)
        for p in prompts:
            serving.check_request(p, s["max_tokens"], self.facts, self.engine["max_model_len"], self.cuda)
        shares = [a.tolist() for a in np.array_split(np.arange(len(prompts)), len(self.workers)) if len(a)]
        calls = [
            (i, "generate", ([prompts[j] for j in idx], idx, sampling, policy_version))
            for i, idx in enumerate(shares)
        ]
        batches = self._run(calls)
        return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> None:
        """Push the trainer's tensors (HF deepseek_v32 names) to every worker; returns when all loaded it."""
        if self.cuda:
            raise NotImplementedError(
                "on CUDA, drive weight_sync_client() with vLLM's NCCLTrainerWeightTransferEngine from "
                "trainer rank 0 (untested in keel)"
            )
        shapes = {n: tuple(t.shape) for n, t in named_tensors.items()}
        weight_sync.check_weights(shapes, self.expected_weights)
        handle = weight_sync.publish_weights(named_tensors, version)
        previous, self.handle, self.version = self.handle, handle, version
        self._run([(i, "update_weights", (handle, version)) for i in range(len(self.workers))])
        if previous is not None:
            weight_sync.release_weights(previous)

    def weight_sync_client(self) -> WorkerWeightSyncClient:
        """CUDA: the `VLLMWeightSyncClient` that vLLM's trainer-side NCCL engine drives."""
        return WorkerWeightSyncClient(self.workers)

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
        if self.handle is not None:
            weight_sync.release_weights(self.handle)
            self.handle = None

    def _run(self, calls: list[tuple[int, str, tuple]]) -> list:
        """Run (worker, method, args) calls; results in call order; re-issue calls whose worker died."""
        results: list = [None] * len(calls)
        pending = {self._submit(*call): k for k, call in enumerate(calls)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done[0])
            try:
                results[k] = ray.get(done[0])
            except ray.exceptions.RayActorError:
                worker = calls[k][0]
                self._recover(worker)
                self.reissued += 1
                pending[self._submit(*calls[k])] = k
        return results

    def _submit(self, worker: int, method: str, args: tuple) -> ray.ObjectRef:
        return getattr(self.workers[worker], method).remote(*args)

    def _recover(self, worker: int, timeout_s: float = 600.0) -> None:
        """Wait for Ray to restart a dead worker, then bring it to the latest weights."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                state = ray.get(self.workers[worker].ping.remote())
                break
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        if self.handle is not None and state["version"] != self.version:
            ray.get(self.workers[worker].update_weights.remote(self.handle, self.version))


class WorkerWeightSyncClient:
    """vLLM's four-method weight-sync protocol, fanned out to every rollout worker (CUDA, untested)."""

    def __init__(self, workers: list) -> None:
        self.workers = workers

    def _all(self, method: str, payload: dict | None = None) -> None:
        ray.get([w.weight_sync_call.remote(method, payload) for w in self.workers])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._all("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")
