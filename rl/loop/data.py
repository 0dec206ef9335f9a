"""Prompt datasets as pyarrow tables with `prompt` (or, in the chat format, `messages`) and `answer` columns, plus
any the rewards read.

A dataset is a generated task (nothing is downloaded) or a file: .parquet, .jsonl, .json, or a Hugging Face
`datasets` save_to_disk directory (read with pyarrow). Every row of a file is checked before anything starts;
a bad one is a DataError naming the file, the row and the column.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from rl.loop.datasets import DataError, DataKeys, check_rows, read_rows, row_field
from rl.model.tokenizer import CharTokenizer

__all__ = ["DataError", "DataKeys", "row_field"]  # re-exported: the dataset files' checks live in rl.loop.datasets


def generate_addition(n: int, seed: int, max_operand: int = 99) -> list[dict]:
    """Rows {"prompt": "a+b=", "answer": "a+b", "domain": "math"}: the quickstart's verifiable task."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "domain": "math"})
    return rows


def generate_sort(n: int, seed: int, min_len: int = 3, max_len: int = 5) -> list[dict]:
    """Rows {"prompt": "3142?", "answer": "1234", "domain": "sort"}: a second short domain for the specialists.

    Digits 1-9 only, so the answer is a number without leading zeros and `exact_match` scores it.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [str(rng.randint(1, 9)) for _ in range(rng.randint(min_len, max_len))]
        rows.append({"prompt": "".join(digits) + "?", "answer": "".join(sorted(digits)), "domain": "sort"})
    return rows


def generate_lookup(n: int, seed: int, length: int = 40) -> list[dict]:
    """Rows {"prompt": "qkzd...7...wx?", "answer": "7", "domain": "lookup"}: find the one digit among letters.

    `length` random letters with one digit at a uniformly drawn position, then "?": the answer is a copy of a
    single token anywhere in a prompt of length + 2 tokens (with <bos>), which is what DSA's top-k has to find
    (a digit's indexer key can be told apart from a letter's, so a trained indexer finds it).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chars = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)]
        digit = str(rng.randint(0, 9))
        chars[rng.randrange(length)] = digit
        rows.append({"prompt": "".join(chars) + "?", "answer": digit, "domain": "lookup"})
    return rows


def _generated(task: str, n: int, seed: int, max_operand: int) -> list[dict]:
    if task == "addition":
        return generate_addition(n, seed, max_operand)
    if task == "sort":
        return generate_sort(n, seed)
    if task == "lookup":
        return generate_lookup(n, seed)
    if task == "arithmetic":
        from rewards.math import generate_arithmetic

        return generate_arithmetic(n, seed, max_operand)
    if task == "logic":
        from rewards.logic import generate_puzzles

        return generate_puzzles(n, seed)
    raise ValueError(f"data.task={task!r} is neither a generated task ({', '.join(GENERATED_TASKS)}) nor a "
                     "dataset file (.parquet, .jsonl, .json, or a `datasets` save_to_disk directory)")


GENERATED_TASKS = ("addition", "sort", "lookup", "arithmetic", "logic")


def is_dataset_file(task: str) -> bool:
    path = Path(task)
    return task not in GENERATED_TASKS and (path.suffix in (".parquet", ".jsonl", ".json") or path.is_dir()
                                            or "/" in task)


def load_dataset(task: str, n: int, seed: int, max_operand: int = 99, keys: DataKeys | None = None,
                 chat: bool = False) -> pa.Table:
    """A generated task of n rows, or every row of a .parquet / .jsonl / .json file or a Hugging Face `datasets`
    save_to_disk directory (n ignored), checked row by row (`check_rows`): the table has `answer` (a string),
    `prompt` (a string) or, with `chat`, possibly `messages` instead, `data_source` when the rows name one, and
    every other column as it was (the rewards see them all)."""
    keys = keys or DataKeys()
    if is_dataset_file(task):
        path = Path(task)
        if not path.exists():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        return check_rows(read_rows(path), str(path), keys, chat)
    return check_rows(_generated(task, n, seed, max_operand), f"data.task={task!r}", keys, chat)


def encode_prompts(table: pa.Table, tokenizer: CharTokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in table.column("prompt").to_pylist()]


def sample_indices(n_rows: int, k: int, seed: int, step: int) -> list[int]:
    """The step's prompts: a deterministic function of (seed, step), so a resumed run draws the same ones."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n_rows, size=k, replace=k > n_rows).tolist()


def sft_sequences(prompts: list[str], answers: list[str], tokenizer: CharTokenizer):
    """(seqs, masks): prompt + answer + <eos> token ids per sample, and 1 on the answer and <eos> only."""
    seqs, masks = [], []
    for p, a in zip(prompts, answers, strict=True):
        prompt, answer = tokenizer.encode(p), tokenizer.encode(a, bos=False) + [tokenizer.eos_id]
        seqs.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    return seqs, masks


def sft_tensors(prompts: list[str], answers: list[str], tokenizer: CharTokenizer):
    """(input_ids, targets, loss_mask), right-padded: loss on the answer and its <eos> only."""
    return pad_sft_sequences(*sft_sequences(prompts, answers, tokenizer))


def pad_sft_sequences(seqs: list[list[int]], masks: list[list[int]]):
    """(input_ids, targets, loss_mask) for next-token training, right-padded with 0.

    `masks[i][t]` = 1 trains token t of sequence i (predicted from the tokens before it); the first
    token is never predicted.
    """
    import torch

    width = max(len(s) for s in seqs) - 1
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.zeros(len(seqs), width, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), width)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        if len(m) != len(s):
            raise ValueError(f"sequence {i}: {len(s)} tokens but a loss mask of {len(m)}")
        t = torch.tensor(s)
        input_ids[i, : len(s) - 1] = t[:-1]
        targets[i, : len(s) - 1] = t[1:]
        loss_mask[i, : len(s) - 1] = torch.tensor(m[1:], dtype=torch.float32)
    return input_ids, targets, loss_mask


def pack_sft_sequences(seqs: list[list[int]], masks: list[list[int]], max_len: int, rows_multiple_of: int = 1):
    """(input_ids, targets, loss_mask, segment_ids): the samples packed into as few rows as first-fit finds.

    Each sample is what `pad_sft_sequences` makes of it: its tokens but the last as inputs, the next token of
    the same sample as targets, so a sample of n tokens takes n - 1 positions and no position predicts a token
    of another sample. Samples go, in order, into the first row with room (greedy first-fit), at most max_len
    positions a row. segment_ids is i + 1 on the positions of sample i and 0 on padding (target 0, loss 0);
    give it to the model so samples do not attend to each other. Rows are as wide as the fullest one; empty
    rows (all padding) make the row count a multiple of rows_multiple_of (the trainer ranks share rows evenly).
    """
    import torch

    if not seqs:
        raise ValueError("no sequences to pack")
    rows: list[list[int]] = []  # sample indices per row
    room: list[int] = []  # positions left per row
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        if len(m) != len(s):
            raise ValueError(f"sequence {i}: {len(s)} tokens but a loss mask of {len(m)}")
        need = len(s) - 1
        if need > max_len:
            raise ValueError(f"sequence {i} has {len(s)} tokens ({need} positions); packed rows hold {max_len} "
                             f"positions (a sample of at most {max_len + 1} tokens): raise the pack length")
        if need < 1:
            raise ValueError(f"sequence {i} has {len(s)} token(s); a training sample needs at least 2")
        row = next((r for r, left in enumerate(room) if left >= need), None)
        if row is None:
            rows.append([])
            room.append(max_len)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= need

    width = max_len - min(room)
    n_rows = -(-max(len(rows), 1) // rows_multiple_of) * rows_multiple_of
    input_ids = torch.zeros(n_rows, width, dtype=torch.long)
    targets = torch.zeros(n_rows, width, dtype=torch.long)
    loss_mask = torch.zeros(n_rows, width)
    segment_ids = torch.zeros(n_rows, width, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            t, n = torch.tensor(seqs[i]), len(seqs[i]) - 1
            input_ids[r, at : at + n] = t[:-1]
            targets[r, at : at + n] = t[1:]
            loss_mask[r, at : at + n] = torch.tensor(masks[i][1:], dtype=torch.float32)
            segment_ids[r, at : at + n] = i + 1
            at += n
    return input_ids, targets, loss_mask, segment_ids


def off_by_one_responses(table: pa.Table, rate: float, seed: int) -> pa.Table:
    """The table with a `response` column for the warm start (`data.sft_off_by_one`): a sloppy teacher's
    demonstrations, the integer answer plus one on a `rate` fraction of the rows (drawn with `seed`), the answer on
    the others. The rewards still check `answer`."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.sft_off_by_one={rate} must be in [0, 1]")
    answers = [str(a) for a in table.column("answer").to_pylist()]
    bad = next((a for a in answers if not a.lstrip("-").isdigit()), None)
    if bad is not None:
        raise DataError(f"data.sft_off_by_one needs integer answers; found {bad!r}")
    wrong = np.random.default_rng([seed, 0x0FF1]).random(len(answers)) < rate
    responses = pa.array([str(int(a) + 1) if w else a for a, w in zip(answers, wrong, strict=True)])
    if "response" in table.column_names:
        return table.set_column(table.column_names.index("response"), "response", responses)
    return table.append_column("response", responses)
