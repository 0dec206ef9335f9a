"""Held-out evaluation sets: no evaluation prompt occurs in the training set.

Generated tasks are drawn that way: the evaluation set is `eval_size` distinct prompts (drawn with eval_seed),
and the training set is `train_size` rows (drawn with seed) of which none repeats an evaluation prompt (rows that
would are left out, and more are drawn). Files are used as they are. Either way `check_held_out` runs before a
run trains or evaluates and raises when an evaluation prompt is also a training prompt, naming some of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pyarrow as pa

MAX_DRAW_FACTOR = 64  # a generated set is drawn at most this many times its size before giving up


class HeldOutError(ValueError):
    """The evaluation set shares prompts with the training set, or a task has too few prompts to split."""


def prompt_key(row: dict) -> str:
    """What makes two rows the same prompt: the prompt text, or the chat messages of a chat row."""
    prompt = row.get("prompt")
    if prompt is not None:
        return str(prompt)
    return json.dumps(row.get("messages"), sort_keys=True)


def _keys(table: pa.Table) -> list[str]:
    if "prompt" in table.column_names and table.column("prompt").null_count == 0:
        return [str(p) for p in table.column("prompt").to_pylist()]
    return [prompt_key(row) for row in table.to_pylist()]


def _draw(load: Callable[[int], pa.Table], n: int, keep: Callable[[list[str]], list[int]], what: str) -> pa.Table:
    """n rows of the generated table `load(m)` (m rows drawn) that `keep` selects, drawing more until there are."""
    m = n
    while True:
        table = load(m)
        rows = keep(_keys(table))
        if len(rows) >= n:
            return table.take(rows[:n])
        if m >= n * MAX_DRAW_FACTOR:
            raise HeldOutError(f"{what}: only {len(rows)} usable rows among {m} drawn, {n} needed; the task has "
                               "too few distinct prompts for this split (lower the size or widen the task)")
        m *= 2


def held_out_split(task: str, eval_task: str, train_size: int, eval_size: int, seed: int, eval_seed: int,
                   load: Callable[[str, int, int], pa.Table], generated: Callable[[str], bool]) -> tuple[pa.Table,
                                                                                                       pa.Table]:
    """(train, eval): `load(task, n, seed)` makes a dataset (generated, or a file's rows); `generated(task)` says
    which. Generated sets are drawn as the module docstring says; file sets are returned as loaded (check them)."""
    eval_source = eval_task or task
    if generated(eval_source):
        def distinct(keys: list[str]) -> list[int]:
            seen: dict[str, int] = {}
            for i, k in enumerate(keys):
                seen.setdefault(k, i)
            return sorted(seen.values())

        eval_set = _draw(lambda m: load(eval_source, m, eval_seed), eval_size, distinct,
                         f"data.eval_task={eval_source!r} (distinct evaluation prompts)")
    else:
        eval_set = load(eval_source, eval_size, eval_seed)
    if generated(task):
        held = set(_keys(eval_set))
        train_set = _draw(lambda m: load(task, m, seed), train_size,
                          lambda keys: [i for i, k in enumerate(keys) if k not in held],
                          f"data.task={task!r} (training rows outside the evaluation set)")
    else:
        train_set = load(task, train_size, seed)
    return train_set, eval_set


def check_held_out(train: pa.Table, eval_set: pa.Table, where: str = "data") -> None:
    """Raise HeldOutError when any evaluation prompt is also a training prompt."""
    train_keys = set(_keys(train))
    shared = [k for k in dict.fromkeys(_keys(eval_set)) if k in train_keys]
    if shared:
        shown = ", ".join(repr(k[:60]) for k in shared[:3])
        raise HeldOutError(
            f"{where}: {len(shared)} of the {len(set(_keys(eval_set)))} evaluation prompts are also training "
            f"prompts (e.g. {shown}); a held-out evaluation needs disjoint sets: give data.eval_task a file "
            "without them, or remove them from the training file")
