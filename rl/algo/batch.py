"""The RolloutBatch contract: one row per sampled response, as a pyarrow record batch.

Rollout workers fill the sampling columns, the task adds rewards (the agent loop its own columns),
the driver adds advantages, the trainer reads it. Everything is a plain Arrow column (no pickles), so
a batch crosses Ray's object store without copies and is dumped to parquet as it is.

Columns (per row = one response o_i to prompt q):
  prompt_index     int64                       which prompt of the step (the GRPO group)
  sample_index     int32                       i in 1..G within the group
  prompt_ids       list<int32>                 tokens of q
  response_ids     list<int32>                 tokens of o_i
  rollout_logprobs list<float32>               log pi_old(o_t) as reported by the inference engine
  sampling_mask    list<list<int32>> (null ok) kept token ids per response position (Keep Sampling
                                               Mask); null when sampling did not truncate the vocab
  routed_experts   list<fixed_size_list<uintN, moe_layers*top_k>> (null ok)
                                               expert ids per token of prompt+response[:-1] (the tokens
                                               that are fed to the model), Keep Routing
  indexer_topk     list<fixed_size_list<uint16|int32, dsa_layers*index_topk>> (null ok)
                                               the engine's indexer selections (Keep Indexer Selection):
                                               per fed token at position >= index_topk (earlier ones select
                                               every earlier token), each DSA layer's index_topk positions;
                                               null when not captured. uint16 when positions fit (max 65535
                                               is the unused-slot sentinel), int32 (-1) otherwise
  loss_mask        list<uint8> (null ok)       1 on model-generated response tokens (agents: tool
                                               output is 0); null means all ones
  finish_reason    string                      "stop" | "length" | ...
  policy_version   int32                       weight version that sampled it
  reward           float32                     the task's score of the response (0 until scored)
  reward_reason    string                      why a reward failed ("" when fine)
  advantage        float32                     filled by the driver (0 until then)

Appended after those by the producer that has them (`append_columns`, `EXTRA_COLUMNS`):
  turns            int32                       assistant turns of an agent episode
  tool_calls       int32                       tool calls the episode made
  segments         int32                       token streams it used: 1 + context-management cuts
  token_versions   list<int32>                 partial rollouts: per response token, the weight version that
                                               sampled it; the row's policy_version is the oldest of them

Who writes what (`check_batch` checks a batch against this contract; tests/test_batch_contract.py and
tests/test_rollout.py run it on each producer's output; docs/BATCH.md has the long form):
  rollout/worker.py RolloutWorker.generate  prompt_index .. indexer_topk, finish_reason, policy_version;
                                            loss_mask null, reward 0, reward_reason "", advantage 0
  rollout/agent/loop.py run_episodes        one row per episode: the worker's columns stitched across its
                                            turns, loss_mask, reward and reward_reason (the environment's
                                            verifier), turns, tool_calls, segments
  rl/loop/tasks.py PromptTask.rollout       reward, reward_reason (the `rewards` package)
  rollout/partial.py PartialRollout         token_versions (rollout.in_flight=partial), chunks spliced
  rl/loop/step.py learn                     advantage (rl.algo.grpo.group_advantages); its parquet dump adds
                                            response_text (string, the decoded response), not part of the batch

Schema metadata carries `moe_layers` and `top_k` so routing reshapes to [tokens, moe_layers, top_k], and
`dsa_layers` and `index_topk` so indexer selections reshape to [tokens, dsa_layers, index_topk].
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

# Columns a producer appends after the schema's own (see the module docstring), with their types.
EXTRA_COLUMNS = {"turns": pa.int32(), "tool_calls": pa.int32(), "segments": pa.int32(),
                 "token_versions": pa.list_(pa.int32())}


def routing_dtype(n_routed_experts: int) -> np.dtype:
    """Narrowest unsigned integer dtype that holds expert ids 0..n_routed_experts-1."""
    if n_routed_experts <= 1 << 8:
        return np.dtype(np.uint8)
    if n_routed_experts <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def selection_dtype(max_model_len: int) -> np.dtype:
    """uint16 when every position and the sentinel fit (2 bytes a position), int32 otherwise."""
    return np.dtype(np.uint16) if max_model_len < (1 << 16) - 1 else np.dtype(np.int32)


def selection_sentinel(dtype: np.dtype) -> int:
    """The value of an unused selection slot in a stored indexer_topk row."""
    return (1 << 16) - 1 if np.dtype(dtype) == np.uint16 else -1


def rollout_schema(moe_layers: int, top_k: int, n_routed_experts: int, dsa_layers: int = 0, index_topk: int = 0,
                   max_model_len: int = 0) -> pa.Schema:
    routing_type = pa.from_numpy_dtype(routing_dtype(n_routed_experts))
    width = max(moe_layers * top_k, 1)
    selection_type = pa.from_numpy_dtype(selection_dtype(max_model_len))
    fields = [
        pa.field("prompt_index", pa.int64()),
        pa.field("sample_index", pa.int32()),
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("response_ids", pa.list_(pa.int32())),
        pa.field("rollout_logprobs", pa.list_(pa.float32())),
        pa.field("sampling_mask", pa.list_(pa.list_(pa.int32())), nullable=True),
        pa.field("routed_experts", pa.list_(pa.list_(routing_type, width)), nullable=True),
        pa.field("indexer_topk", pa.list_(pa.list_(selection_type, max(dsa_layers * index_topk, 1))), nullable=True),
        pa.field("loss_mask", pa.list_(pa.uint8()), nullable=True),
        pa.field("finish_reason", pa.string()),
        pa.field("policy_version", pa.int32()),
        pa.field("reward", pa.float32()),
        pa.field("reward_reason", pa.string()),
        pa.field("advantage", pa.float32()),
    ]
    meta = {"moe_layers": str(moe_layers), "top_k": str(top_k), "n_routed_experts": str(n_routed_experts),
            "dsa_layers": str(dsa_layers), "index_topk": str(index_topk)}
    return pa.schema(fields, metadata=meta)


def make_rollout_batch(rows: Sequence[dict], schema: pa.Schema) -> pa.RecordBatch:
    """Build a RolloutBatch from python rows. `routed_experts` may be an array [tokens, L, K].

    Missing reward/advantage columns are filled with 0 and reward_reason with "".
    """
    columns = {}
    for field in schema:
        name = field.name
        values = []
        for row in rows:
            v = row.get(name)
            if v is None and name in ("reward", "advantage"):
                v = 0.0
            elif v is None and name == "reward_reason":
                v = ""
            elif v is not None and name in ("routed_experts", "indexer_topk"):
                arr = np.asarray(v)
                v = arr.reshape(arr.shape[0], field.type.value_type.list_size)
            elif isinstance(v, np.ndarray):
                v = v.tolist() if name != "sampling_mask" else [list(x) for x in v]
            values.append(v)
        if name in ("routed_experts", "indexer_topk"):
            columns[name] = _per_token_array(values, field.type, name)
        else:
            columns[name] = pa.array(values, type=field.type)
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def _per_token_array(values: list, typ: pa.DataType, name: str) -> pa.Array:
    """list<fixed_size_list<int>> from [tokens, width] arrays without going through python ints."""
    width = typ.value_type.list_size
    np_dtype = typ.value_type.value_type.to_pandas_dtype()
    offsets, flats, validity = [0], [], []
    for v in values:
        if v is None:
            offsets.append(offsets[-1])
            validity.append(False)
            continue
        if v.shape[1] != width:
            raise ValueError(f"{name} rows have {v.shape[1]} ids per token, schema expects {width}")
        flats.append(np.ascontiguousarray(v, dtype=np_dtype).reshape(-1))
        offsets.append(offsets[-1] + v.shape[0])
        validity.append(True)
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np_dtype)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
    mask = pa.array([not ok for ok in validity])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner, mask=mask)


def routing_of(batch: pa.RecordBatch | pa.Table, row: int) -> np.ndarray | None:
    """The recorded expert ids of one row as an array [tokens, moe_layers, top_k] (None if absent)."""
    meta = batch.schema.metadata
    moe_layers, top_k = int(meta[b"moe_layers"]), int(meta[b"top_k"])
    cell = batch.column("routed_experts")[row]
    if not cell.is_valid:
        return None
    flat = cell.values.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, moe_layers, top_k)


def stored_selections(batch: pa.RecordBatch | pa.Table, row: int) -> tuple[np.ndarray, int] | None:
    """One row's indexer_topk as stored ([positions >= index_topk, dsa_layers * index_topk], the batch's dtype
    and sentinel) with index_topk, for copying into another batch; None if absent."""
    meta = batch.schema.metadata or {}
    if "indexer_topk" not in batch.schema.names or not int(meta.get(b"dsa_layers", 0)):
        return None
    cell = batch.column("indexer_topk")[row]
    if not cell.is_valid:
        return None
    width = batch.schema.field("indexer_topk").type.value_type.list_size
    return cell.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width), int(meta[b"index_topk"])


def indexer_topk_of(batch: pa.RecordBatch | pa.Table, row: int) -> np.ndarray | None:
    """The recorded indexer selections of one row, [tokens at positions >= index_topk, dsa_layers, index_topk]
    int64 with -1 in unused slots (None if absent)."""
    meta = batch.schema.metadata
    layers, k = int(meta.get(b"dsa_layers", 0)), int(meta.get(b"index_topk", 0))
    if "indexer_topk" not in batch.schema.names or not layers:
        return None
    cell = batch.column("indexer_topk")[row]
    if not cell.is_valid:
        return None
    flat = cell.values.flatten().to_numpy(zero_copy_only=False)
    out = flat.astype(np.int64).reshape(-1, layers, k)
    out[flat.reshape(-1, layers, k) == selection_sentinel(flat.dtype)] = -1
    return out


def with_columns(batch: pa.RecordBatch, **columns: Sequence) -> pa.RecordBatch:
    """A copy of `batch` with the named columns replaced (types kept)."""
    arrays = []
    for field in batch.schema:
        if field.name in columns:
            arrays.append(pa.array(columns[field.name], type=field.type))
        else:
            arrays.append(batch.column(field.name))
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def append_columns(batch: pa.RecordBatch, **columns: Sequence) -> pa.RecordBatch:
    """`batch` with extra columns of the contract (`EXTRA_COLUMNS`) appended, each with its contract type."""
    for name, values in columns.items():
        if name not in EXTRA_COLUMNS:
            raise ValueError(f"{name!r} is not a RolloutBatch column; the extra columns are {sorted(EXTRA_COLUMNS)}")
        batch = batch.append_column(pa.field(name, EXTRA_COLUMNS[name]), pa.array(values, EXTRA_COLUMNS[name]))
    return batch


def _per_token(t: pa.DataType) -> bool:
    """list<fixed_size_list<int>>: the routed_experts / indexer_topk layout, whose value type and width vary."""
    return pa.types.is_list(t) and pa.types.is_fixed_size_list(t.value_type) and pa.types.is_integer(
        t.value_type.value_type)


def check_batch(batch: pa.RecordBatch | pa.Table) -> None:
    """A ValueError naming every way `batch` departs from the contract: the schema's columns, in order, with
    their types (per-token columns: integer ids, the width the metadata implies), then only `EXTRA_COLUMNS`."""
    meta = {k.decode(): int(v) for k, v in (batch.schema.metadata or {}).items()}
    if not {"moe_layers", "top_k", "n_routed_experts"} <= set(meta):
        raise ValueError(f"RolloutBatch schema metadata lacks moe_layers/top_k/n_routed_experts: {sorted(meta)}")
    params = inspect.signature(rollout_schema).parameters
    expected = rollout_schema(**{k: v for k, v in meta.items() if k in params})
    problems = []
    core = batch.schema.names[: len(expected)]
    if core != expected.names:
        problems.append(f"columns {core} where the contract has {expected.names}")
    for field in batch.schema:
        if field.name in expected.names:
            want = expected.field(field.name).type
            same = field.type == want or (_per_token(field.type) and _per_token(want)
                                          and field.type.value_type.list_size == want.value_type.list_size)
        elif field.name in EXTRA_COLUMNS:
            want, same = EXTRA_COLUMNS[field.name], field.type == EXTRA_COLUMNS[field.name]
        else:
            problems.append(f"column {field.name!r} is not in the contract (rl/algo/batch.py)")
            continue
        if not same:
            problems.append(f"column {field.name!r} has type {field.type}, the contract says {want}")
    if problems:
        raise ValueError("RolloutBatch departs from its contract: " + "; ".join(problems))
