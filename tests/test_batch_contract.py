"""The RolloutBatch contract (rl/algo/batch.py) and every producer's output checked against it, without an engine:
the agent loop's episode rows, the prompt task's rewards and the driver's advantages (and its parquet dump).
The rollout worker's own output is checked in tests/test_rollout.py, which has an engine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_agent_loop import TEMPLATE, TOKENIZER, LookupEnv

from rl.algo.batch import EXTRA_COLUMNS, append_columns, check_batch, make_rollout_batch, rollout_schema

MOE_LAYERS, TOP_K, EXPERTS = 1, 2, 4
SCHEMA = rollout_schema(MOE_LAYERS, TOP_K, EXPERTS)


class WorkerLike:
    """Answers like a RolloutWorker (same `generate` signature, rows built on the worker's schema): the first turn
    of an episode looks its name up, a turn that sees a tool result answers; routing covers every fed token."""

    version = 0  # the weight version it serves (RolloutClient.version)

    def __init__(self, text=None):
        self.text = text or (lambda prompt: "ok>answer: 42|" if "t:" in prompt else "look><look(key=abc)>|")

    def generate(self, prompts, sampling, policy_version, prompt_indices=None):
        indices = list(range(len(prompts))) if prompt_indices is None else prompt_indices
        rows = []
        for k, prompt in enumerate(prompts):
            for i in range(sampling.get("n", 1)):
                response = TOKENIZER.encode(self.text(TOKENIZER.decode(prompt)), bos=False)
                fed = len(prompt) + len(response) - 1
                rows.append(dict(prompt_index=indices[k], sample_index=i, prompt_ids=list(prompt),
                                 response_ids=response, rollout_logprobs=[-0.5] * len(response),
                                 sampling_mask=[sorted({t, 3}) for t in response],
                                 routed_experts=np.zeros((fed, MOE_LAYERS, TOP_K), dtype=np.uint8),
                                 finish_reason="stop", policy_version=policy_version))
        return make_rollout_batch(rows, SCHEMA)


def test_the_schema_and_its_extra_columns_pass():
    batch = WorkerLike().generate([[1, 5, 6]], {"n": 2}, 0)
    check_batch(batch)
    check_batch(append_columns(batch, turns=[1, 2], tool_calls=[0, 1], segments=[1, 1]))
    check_batch(append_columns(batch, token_versions=[[0] * len(r) for r in batch["response_ids"].to_pylist()]))
    assert set(EXTRA_COLUMNS) == {"turns", "tool_calls", "segments", "token_versions"}


def test_a_batch_off_the_contract_is_refused_with_the_column_named():
    batch = WorkerLike().generate([[1, 5, 6]], {"n": 2}, 0)
    with pytest.raises(ValueError, match="'surprise' is not in the contract"):
        check_batch(batch.append_column("surprise", pa.array([1, 2])))
    with pytest.raises(ValueError, match="'reward' has type double"):
        check_batch(batch.set_column(batch.schema.get_field_index("reward"), "reward", pa.array([0.0, 1.0])))
    with pytest.raises(ValueError, match="columns"):
        check_batch(batch.remove_column(batch.schema.get_field_index("advantage")))
    with pytest.raises(ValueError, match="not a RolloutBatch column"):
        append_columns(batch, surprise=[1, 2])


def test_agent_episode_rows_keep_the_contract():
    from rollout.agent.loop import run_episodes

    envs = [LookupEnv(s) for s in range(4)]
    batch, _ = run_episodes(WorkerLike(), envs, TEMPLATE, TOKENIZER, {"max_tokens": 24}, max_turns=3,
                            max_total_tokens=400, prompt_indices=[0, 0, 1, 1])
    check_batch(batch)
    rows = batch.to_pylist()
    assert [r["turns"] for r in rows] == [2] * 4 and [r["tool_calls"] for r in rows] == [1] * 4
    assert all(r["loss_mask"] is not None and r["reward_reason"] == "" for r in rows)


def test_prompt_task_rewards_and_driver_advantages_keep_the_contract(tmp_path, monkeypatch):
    """One RL step's batch, as the trainer gets it and as the parquet dump holds it."""
    from rl.loop.config import load_config
    from rl.loop.driver import Run, rl_step
    from rl.loop.tasks import PromptTask

    cfg = load_config("configs/quickstart.yaml", ["rollout.prompts_per_step=3", "rollout.group_size=2",
                                                  "data.train_size=20", "data.eval_size=4"])
    monkeypatch.setattr(PromptTask, "score", lambda self, batch, rows: (
        [float(i % 2) for i in range(batch.num_rows)], ["" if i % 3 else "timeout" for i in range(batch.num_rows)],
        ["text"] * batch.num_rows))
    run = Run(cfg, tmp_path)

    class Trainer:
        publisher_node, seen = "node-0", []

        def grpo_step(self, batch):
            self.seen.append(batch)
            return {}

        def publish_weights(self, version, file, blob):
            return ("handle", version, file, blob)

    class Client(WorkerLike):
        loaded, cuda, sleeps = [], False, False

        def transport_plan(self, node):
            return (node == "node-0", False)

        def load_weights(self, handle):
            self.loaded.append(handle)

    trainer, client = Trainer(), Client(lambda prompt: "12")
    rl_step(run, trainer, client, step=4)
    [batch] = trainer.seen
    check_batch(batch)
    assert batch.column("advantage").to_pylist() == [-0.5, 0.5] * 3  # r - mean(group) of rewards 0, 1
    assert client.loaded == [("handle", 5, True, False)]  # the trainer published; the client loaded its handle
    dump = pq.read_table(tmp_path / "rollouts" / "step_000005.parquet")
    assert dump.column_names == batch.schema.names + ["response_text"]


def test_cuda_step_sleeps_the_engines_around_the_update_and_syncs_over_nccl(tmp_path, monkeypatch):
    """The driver's CUDA path, with fakes that record the order of calls: the engines sleep while the trainer
    steps, wake their weights for the sync and their KV cache after it; rank 0 joins the NCCL group once and sends
    every version. (The calls themselves are vLLM's and need a GPU; this checks only who calls what, when.)"""
    from rl.loop.config import load_config
    from rl.loop.driver import Run, rl_step
    from rl.loop.tasks import PromptTask

    cfg = load_config("configs/quickstart.yaml", ["rollout.prompts_per_step=2", "rollout.group_size=2",
                                                  "data.train_size=20", "data.eval_size=4", "run.dump_rollouts=false"])
    monkeypatch.setattr(PromptTask, "score", lambda self, batch, rows: (
        [0.0] * batch.num_rows, [""] * batch.num_rows, ["text"] * batch.num_rows))
    run = Run(cfg, tmp_path)
    calls = []

    class Trainer:
        weight_sync_open = False

        def grpo_step(self, batch):
            calls.append("train")
            return {}

        def open_weight_sync(self, client, world_size, dtype, bucket_mb):
            calls.append(("open", client, world_size, dtype, bucket_mb))
            self.weight_sync_open = True

        def send_weights(self, version):
            calls.append(("send", version))

        def publish_weights(self, *args):
            raise AssertionError("the CPU path on CUDA")

    class Client(WorkerLike):
        cuda, sleeps = True, True
        engine = type("Engine", (), {"dtype": "bfloat16", "weight_bucket_mb": 256})()

        def sleep(self):
            calls.append("sleep")

        def wake_up(self, tags):
            calls.append(("wake", tuple(tags)))

        def weight_sync_client(self):
            return "sync-client"

        def weight_sync_world_size(self):
            return 3

        def weights_synced(self, version):
            calls.append(("synced", version))

    trainer, client = Trainer(), Client(lambda prompt: "12")
    rl_step(run, trainer, client, step=0)
    rl_step(run, trainer, client, step=1)
    one = ["sleep", "train", ("wake", ("weights",))]
    assert calls == [*one, ("open", "sync-client", 3, "bfloat16", 256), ("send", 1), ("synced", 1),
                     ("wake", ("kv_cache",)),
                     *one, ("send", 2), ("synced", 2), ("wake", ("kv_cache",))]
