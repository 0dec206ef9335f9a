"""One GRPO step of `keel train`: collect (rollout and reward), learn (advantages, update, dump, metrics), and
bring the rollout engines to the new weights.

Synchronous (`rollout.max_staleness: 0`): `rl_step` does the three in order, so every batch is sampled by the
weights it is trained against (version = step). Asynchronous: rl/loop/pipeline.py runs `collect` in a producer
thread with older weights and `async_step` learns and publishes in the main thread.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rl.algo.batch import with_columns
from rl.algo.grpo import group_advantages
from rl.loop.data import sample_indices
from rl.loop.pipeline import LaggedRollouts, stale_rows
from rollout.partial import PartialRollout, VersionSwitch, version_lag_fractions

Collected = tuple[pa.RecordBatch, dict[str, float], list[str]]  # (scored batch, rollout metrics, response texts)


def collect(run: Any, client: Any, step: int) -> Collected:
    """Step `step`'s prompts sampled and scored (reward functions for prompts, the environment's verifier inside
    agent episodes), with the rollout's and reward's times."""
    cfg = run.cfg
    t = time.perf_counter()
    idx = sample_indices(run.task.num_train, cfg.rollout.prompts_per_step, cfg.run.seed, step)
    batch, metrics, texts = run.task.rollout(client, idx, run.sampling(step + 1), step)
    metrics["time/reward"] = metrics.get("time/reward", 0.0)  # agents: verifiers run inside the episodes
    metrics["time/rollout"] = time.perf_counter() - t - metrics["time/reward"]
    return batch, metrics, texts


def collect_partial(run: Any, client: Any, step: int, switch: VersionSwitch | None) -> Collected:
    """collect() with partial rollouts (rollout.in_flight=partial, rollout/partial.py): requests unfinished after
    the first chunk move to switch.target. time/wait_version is the wait for that version (not in time/rollout);
    async/resubmitted counts the requests moved."""
    partial = PartialRollout(client, run.cfg.rollout.partial_chunk_tokens, switch)
    batch, metrics, texts = collect(run, partial, step)
    metrics["time/rollout"] -= partial.waited_s
    metrics.update({"time/wait_version": partial.waited_s, "async/resubmitted": float(partial.resubmitted)})
    return batch, metrics, texts


def rl_step(run: Any, trainer: Any, client: Any, step: int) -> dict[str, float]:
    """Rollout -> reward -> update -> weight sync, in that order."""
    start = time.perf_counter()
    collected = collect(run, client, step)
    if client.sleeps:  # CUDA, engines colocated with the trainer: free their GPU memory while it steps
        client.sleep()
    metrics = learn(run, trainer, step, collected)
    t = time.perf_counter()
    if client.sleeps:
        client.wake_up(["weights"])  # the KV cache comes back after the sync, so it is not held during it
    sync_weights(trainer, client, version=step + 1)
    if client.sleeps:
        client.wake_up(["kv_cache"])
    metrics["time/sync"] = time.perf_counter() - t
    metrics["time/step"] = time.perf_counter() - start  # the phases plus the driver's own work between them
    return metrics


def async_step(run: Any, trainer: Any, client: Any, rollouts: LaggedRollouts, step: int) -> dict[str, float]:
    """Take step `step`'s batch from the producer (sampled by an older version), update, publish version step + 1.
    time/rollout is the producer's sampling time, time/wait_rollout what the trainer waited for it."""
    start = time.perf_counter()
    collected = rollouts.take(step)
    wait = time.perf_counter() - start
    metrics = learn(run, trainer, step, collected)
    t = time.perf_counter()
    file, blob = client.transport_plan(trainer.publisher_node)
    rollouts.publish(step + 1, lambda: trainer.publish_weights(step + 1, file=file, blob=blob))
    metrics.update({"time/wait_rollout": wait, "time/sync": time.perf_counter() - t,
                    "time/step": time.perf_counter() - start})
    return metrics


def drop_stale(collected: Collected, step: int, max_staleness: int, policy: str) -> tuple[Collected,
                                                                                          dict[str, float]]:
    """The batch (and its texts) without rows sampled more than max_staleness versions before the trainer's version
    (= step) when `policy` is "drop" (kept, and counted, when "keep"), and the staleness metrics."""
    batch, rollout_metrics, texts = collected
    versions = batch.column("policy_version").to_pylist()
    stale = stale_rows(versions, step, max_staleness)
    lags = [step - v for v in versions]
    metrics = {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags)),
               "async/stale_samples": float(sum(stale)),
               "async/dropped_samples": float(sum(stale)) if policy == "drop" else 0.0}
    if policy == "drop" and any(stale):
        batch = batch.filter(pa.array([not s for s in stale]))
        texts = [text for text, s in zip(texts, stale, strict=True) if not s]
    if "token_versions" in batch.schema.names:  # partial rollouts: the trained tokens by their version's lag
        lags = version_lag_fractions(batch.column("token_versions").to_pylist(), step)
        metrics.update({f"async/token_frac_lag{k}": f for k, f in lags.items()})
    return (batch, rollout_metrics, texts), metrics


def learn(run: Any, trainer: Any, step: int, collected: Collected) -> dict[str, float]:
    """Advantages, the GRPO update (the trainer's version becomes step + 1), the rollout dump and the metrics."""
    cfg = run.cfg
    n = cfg.rollout.get("max_staleness", 0)
    staleness = {}
    if n:
        collected, staleness = drop_stale(collected, step, n, cfg.rollout.get("stale_policy", "drop"))
    batch, metrics, texts = collected
    metrics.update(staleness)
    if batch.num_rows == 0:  # only when stale rows are dropped; v(t) never lags more than N, so it does not happen
        raise RuntimeError(f"step {step + 1}: every sample was older than rollout.max_staleness={n}")
    rewards = batch.column("reward").to_pylist()
    reasons = batch.column("reward_reason").to_pylist()
    rewards_t = torch.tensor(rewards)
    advantages = group_advantages(rewards_t, cfg.rollout.group_size, normalize_std=cfg.grpo.normalize_std)
    batch = with_columns(batch, advantage=advantages.tolist())

    t = time.perf_counter()
    metrics.update(trainer.grpo_step(batch))
    metrics["time/train"] = time.perf_counter() - t
    if n:  # the off-policy mask's work, by how old the batch was
        metrics[f"async/masked_seq_frac_lag{int(metrics['async/staleness_max'])}"] = metrics.get("masked_seq_frac", 0)

    if cfg.run.dump_rollouts:
        t = time.perf_counter()
        dump = pa.Table.from_batches([batch]).append_column("response_text", pa.array(texts))
        (run.dir / "rollouts").mkdir(exist_ok=True)
        pq.write_table(dump, run.dir / "rollouts" / f"step_{step + 1:06d}.parquet")
        metrics["time/dump"] = time.perf_counter() - t

    # Generated tokens only: an agent episode's response also holds tool results (loss mask 0).
    masks = batch.column("loss_mask").to_pylist()
    lengths = [len(r) if m is None else sum(m) for r, m in zip(batch.column("response_ids").to_pylist(), masks,
                                                                strict=True)]
    metrics.update(
        {
            "reward/mean": float(rewards_t.mean()),
            "reward/std": float(rewards_t.std()) if len(rewards) > 1 else 0.0,
            "accuracy": float((rewards_t >= run.task.full_reward - 1e-6).float().mean()),
            "response_length": sum(lengths) / len(lengths),
            "reward_failures": float(sum(bool(r) for r in reasons)),
            "tokens_per_s": sum(lengths) / max(metrics["time/rollout"], 1e-9),
        }
    )
    return metrics


def sync_weights(trainer: Any, client: Any, version: int) -> None:
    """The rollout workers get the trainer's current weights as `version`; only rank 0 moves them.

    CPU: rank 0 publishes them the way the client's workers can reach them from rank 0's node, and the workers
    load them; only the handle (a path, shapes, an object-store ref) passes through here. CUDA: rank 0 broadcasts
    them over NCCL through vLLM's weight-transfer engine (joining the group with the workers on the first sync);
    nothing but the call passes through here (written against vLLM 0.32; not yet run on a GPU)."""
    if client.cuda:
        if not trainer.weight_sync_open:
            engine = client.engine
            trainer.open_weight_sync(client.weight_sync_client(), client.weight_sync_world_size(), engine.dtype,
                                     engine.weight_bucket_mb)
        trainer.send_weights(version)
        client.weights_synced(version)
        return
    file, blob = client.transport_plan(trainer.publisher_node)
    client.load_weights(trainer.publish_weights(version, file=file, blob=blob))
