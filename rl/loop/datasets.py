"""Dataset files as keel reads them: .parquet, .jsonl, .json, or a Hugging Face `datasets` save_to_disk directory
(its Arrow files, read with pyarrow; the `datasets` package is not needed), and the rows checked one by one.

A row needs a prompt (a string) or, in the chat format, a chat (`messages`: a list of {role, content} ending with
the user's message), an answer (a string or a number); it may name its data source (data_source or domain) and
carry any other columns, which the rewards receive. Column names are configurable (`DataKeys`). Anything wrong is
a DataError naming the file, and the row and column where there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset keel cannot train on; the message names the file, and the row and column where there is one."""


@dataclass(frozen=True)
class DataKeys:
    """Which columns of a dataset file hold what (`data.*_key`); a dotted key reads a field of a struct column
    ("reward_model.ground_truth", as verl's datasets store the answer)."""

    prompt: str = "prompt"  # a string
    messages: str = "messages"  # a chat: a list of {"role": system | user | assistant, "content": str}
    answer: str = "answer"  # a string or a number, given to the rewards as sample["answer"]
    response: str = ""  # the SFT warm start's reference responses; "": the answer itself
    source: str = ""  # picks each row's rewards (rewards_by_source); "": data_source, else domain

    @classmethod
    def of(cls, data: Any) -> DataKeys:
        return cls(data.prompt_key, data.messages_key, data.answer_key, data.response_key, data.source_key)


def read_rows(path: Path) -> list[dict]:
    """Every row of a dataset file as a dict; a file that cannot be read is a DataError naming it."""
    if path.is_dir():
        table = _read_saved_dataset(path)
    elif path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable parquet file ({_one_line(err)})") from None
    else:
        rows = _read_json_rows(path)
        if not rows:
            raise DataError(f"{path}: the file has no rows")
        return rows
    if table.num_rows == 0:
        raise DataError(f"{path}: the dataset has no rows (columns: {table.column_names})")
    return table.to_pylist()


def _read_json_rows(path: Path) -> list[dict]:
    """A .jsonl file (one JSON object a line; blank lines skipped) or a .json file holding a list of objects."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        lines = [None] * len(rows)
    else:
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({err})") from None
            lines.append(number)
    for i, (row, line) in enumerate(zip(rows, lines, strict=True)):
        if not isinstance(row, dict):
            where = f"line {line}" if line else f"row {i}"
            raise DataError(f"{path}: {where}: a row must be a JSON object, got {type(row).__name__}")
    return rows


def _read_saved_dataset(path: Path) -> pa.Table:
    """A `datasets` Dataset.save_to_disk directory, read with pyarrow: state.json lists its Arrow (IPC stream)
    files. A DatasetDict directory (dataset_dict.json) names its splits: point data.task at one of them."""
    if (path / "dataset_dict.json").exists():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits")
        except (json.JSONDecodeError, AttributeError):
            splits = None
        raise DataError(f"{path}: a DatasetDict with splits {splits}; give one split's directory, e.g. "
                        f"{path / (splits[0] if splits else 'train')}")
    state = path / "state.json"
    if state.exists():
        try:
            files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{state}: not a `datasets` state file ({_one_line(err)})") from None
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{path}: a directory without Arrow files; a dataset directory is what Hugging Face "
                        "`datasets` save_to_disk writes (state.json and data-*.arrow)")
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                try:
                    tables.append(pa.ipc.open_stream(source).read_all())
                except pa.ArrowInvalid:
                    source.seek(0)
                    tables.append(pa.ipc.open_file(source).read_all())
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{f}: not a readable Arrow file ({_one_line(err)})") from None
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: its Arrow files have different columns ({_one_line(err)})") from None


_MISSING = object()


def row_field(row: dict, key: str) -> Any:
    """row[key], a dotted key reading into nested objects; _MISSING where a part is absent."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _has_key(rows: list[dict], key: str) -> bool:
    return bool(key) and row_field(rows[0], key) is not _MISSING


def check_rows(rows: list[dict], name: str, keys: DataKeys, chat: bool) -> pa.Table:
    """The rows as a table with the canonical columns, or a DataError naming `name`, the row and the column.

    A row needs a prompt: `keys.prompt` (a non-empty string) or, with `chat`, `keys.messages` (a non-empty list
    of {"role", "content"} ending with a user message); an answer (`keys.answer`: a string or a number); the
    reference response (`keys.response`, when set: a string); the source (data_source or domain unless
    `keys.source` names another; a string or null) picks the row's rewards."""
    if not rows:
        raise DataError(f"{name}: the dataset has no rows")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    use_messages = chat and _has_key(rows, keys.messages)
    if not use_messages and not _has_key(rows, keys.prompt):
        if _has_key(rows, keys.messages):
            raise DataError(f"{name}: column '{keys.messages}' holds chats, which need data.format=chat (or give a "
                            f"'{keys.prompt}' column); columns: {columns}")
        raise DataError(f"{name}: no column '{keys.prompt}' (data.prompt_key) or '{keys.messages}' "
                        f"(data.messages_key); columns: {columns}")
    if not _has_key(rows, keys.answer):
        raise DataError(f"{name}: no column '{keys.answer}' (data.answer_key); columns: {columns}")
    if keys.response and not _has_key(rows, keys.response):
        raise DataError(f"{name}: no column '{keys.response}' (data.response_key); columns: {columns}")
    source = keys.source or next((k for k in ("data_source", "domain") if _has_key(rows, k)), "")
    if keys.source and not _has_key(rows, keys.source):
        raise DataError(f"{name}: no column '{keys.source}' (data.source_key); columns: {columns}")

    def fail(i: int, key: str, problem: str):
        raise DataError(f"{name}: row {i}: column '{key}' {problem}")

    prompts, chats, answers, sources = [], [], [], []
    for i, row in enumerate(rows):
        if use_messages:
            chats.append(_check_messages(row_field(row, keys.messages), lambda p, i=i: fail(i, keys.messages, p)))
        else:
            prompt = row_field(row, keys.prompt)
            if prompt is _MISSING or prompt is None:
                fail(i, keys.prompt, "is missing (null)")
            if not isinstance(prompt, str):
                fail(i, keys.prompt, f"must be a string, got {type(prompt).__name__} {_short(prompt)}")
            if not prompt.strip():
                fail(i, keys.prompt, "is an empty string")
            prompts.append(prompt)
        answer = row_field(row, keys.answer)
        if answer is _MISSING or answer is None:
            fail(i, keys.answer, "is missing (null)")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            fail(i, keys.answer, f"must be a string or a number, got {type(answer).__name__} {_short(answer)}")
        answers.append(str(answer))
        if keys.response:
            response = row_field(row, keys.response)
            if not isinstance(response, str) or not response:
                fail(i, keys.response, f"must be a non-empty string, got {_short(response)}")
        if source:
            value = row_field(row, source)
            if value is not _MISSING and value is not None and not isinstance(value, str):
                fail(i, source, f"must be a string (the reward's data source), got {type(value).__name__} "
                                f"{_short(value)}")
            sources.append(value if isinstance(value, str) else "")

    canonical: dict[str, pa.Array] = {"answer": pa.array(answers, pa.string())}
    if use_messages:
        canonical["messages"] = pa.array(chats, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    else:
        canonical["prompt"] = pa.array(prompts, pa.string())
    if source:
        canonical["data_source"] = pa.array(sources, pa.string())
    extras = [c for c in columns if c not in canonical]
    table = _extras_table(rows, extras, name)
    for column, values in canonical.items():
        table = table.append_column(column, values)
    return table


def _check_messages(value: Any, fail) -> list[dict]:
    if value is _MISSING or value is None:
        fail("is missing (null)")
    if not isinstance(value, list) or not value:
        fail(f"must be a non-empty list of messages, got {_short(value)}")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            fail(f"message {j} must be an object with role and content, got {_short(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            fail(f"message {j}: role {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str):
            fail(f"message {j}: content must be a string, got {_short(content)}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        fail(f"the last message is {out[-1]['role']!r}; a prompt ends with the user's message")
    return out


def _extras_table(rows: list[dict], columns: list[str], name: str) -> pa.Table:
    """The rows' other columns as a table (the rewards read them); a column whose rows hold values of types
    Arrow cannot put in one column is a DataError naming the first such row."""
    arrays = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        try:
            arrays[column] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            first = next(v for v in values if v is not None)
            for i, v in enumerate(values):
                if v is not None and not (type(v) is type(first) or {type(v), type(first)} <= {int, float}):
                    raise DataError(f"{name}: row {i}: column '{column}' holds {type(v).__name__} {_short(v)} where "
                                    f"earlier rows hold {type(first).__name__}") from None
            raise DataError(f"{name}: column '{column}' holds values Arrow cannot put in one column") from None
    return pa.table(arrays) if arrays else pa.table({"_": pa.nulls(len(rows))}).drop_columns(["_"])


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
