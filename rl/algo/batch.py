"""The RolloutBatch contract: one row per sampled response, as a pyarrow record batch.

Rollout workers fill the sampling columns, the driver adds rewards and advantages, the trainer
reads it. Everything is a plain Arrow column (no pickles), so a batch crosses Ray's object
store without copies and is dumped to parquet as it is.

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
  loss_mask        list<uint8> (null ok)       1 on model-generated response tokens (agents: tool
                                               output is 0); null means all ones
  finish_reason    string                      "stop" | "length" | ...
  policy_version   int32                       weight version that sampled it
  reward           float32                     filled by the driver
  reward_reason    string                      why a reward failed ("" when fine)
  advantage        float32                     filled by the driver

Schema metadata carries `moe_layers` and `top_k` so routing reshapes to [tokens, moe_layers, top_k].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

SAMPLING_FIELDS = (
    "prompt_index",
    "sample_index",
    "prompt_ids",
    "response_ids",
    "rollout_logprobs",
    "sampling_mask",
    "routed_experts",
    "loss_mask",
    "finish_reason",
    "policy_version",
)


def routing_dtype(n_routed_experts: int) -> np.dtype:
    """Narrowest unsigned integer dtype that holds expert ids 0..n_routed_experts-1."""
    if n_routed_experts <= 1 << 8:
        return np.dtype(np.uint8)
    if n_routed_experts <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def rollout_schema(moe_layers: int, top_k: int, n_routed_experts: int) -> pa.Schema:
    routing_type = pa.from_numpy_dtype(routing_dtype(n_routed_experts))
    width = max(moe_layers * top_k, 1)
    fields = [
        pa.field("prompt_index", pa.int64()),
        pa.field("sample_index", pa.int32()),
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("response_ids", pa.list_(pa.int32())),
        pa.field("rollout_logprobs", pa.list_(pa.float32())),
        pa.field("sampling_mask", pa.list_(pa.list_(pa.int32())), nullable=True),
        pa.field("routed_experts", pa.list_(pa.list_(routing_type, width)), nullable=True),
        pa.field("loss_mask", pa.list_(pa.uint8()), nullable=True),
        pa.field("finish_reason", pa.string()),
        pa.field("policy_version", pa.int32()),
        pa.field("reward", pa.float32()),
        pa.field("reward_reason", pa.string()),
        pa.field("advantage", pa.float32()),
    ]
    meta = {"moe_layers": str(moe_layers), "top_k": str(top_k), "n_routed_experts": str(n_routed_experts)}
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
            elif v is not None and name == "routed_experts":
                arr = np.asarray(v)
                v = arr.reshape(arr.shape[0], -1)
            elif isinstance(v, np.ndarray):
                v = v.tolist() if name != "sampling_mask" else [list(x) for x in v]
            values.append(v)
        if name == "routed_experts":
            columns[name] = _routing_array(values, field.type)
        else:
            columns[name] = pa.array(values, type=field.type)
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def _routing_array(values: list, typ: pa.DataType) -> pa.Array:
    """list<fixed_size_list<uintN>> from [tokens, L*K] arrays without going through python ints."""
    width = typ.value_type.list_size
    np_dtype = typ.value_type.value_type.to_pandas_dtype()
    offsets, flats, validity = [0], [], []
    for v in values:
        if v is None:
            offsets.append(offsets[-1])
            validity.append(False)
            continue
        if v.shape[1] != width:
            raise ValueError(f"routed_experts rows have {v.shape[1]} ids per token, schema expects {width}")
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


def with_columns(batch: pa.RecordBatch, **columns: Sequence) -> pa.RecordBatch:
    """A copy of `batch` with the named columns replaced (types kept)."""
    arrays = []
    for field in batch.schema:
        if field.name in columns:
            arrays.append(pa.array(columns[field.name], type=field.type))
        else:
            arrays.append(batch.column(field.name))
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)
