"""Generated logic puzzles with unique answers, and their checker.

Three kinds, all generated from a seed so a logic specialist has data without downloads:
- "chain": an arithmetic chain ("Start with 4, add 3, multiply by 2. Result?") -> "14";
- "sort": sort distinct numbers ascending -> "7 19 42 88";
- "order": who stands where in a row, from clues that admit exactly one arrangement -> "Ben Ana Cai".
The checker takes the response's final answer (boxed, <answer>, "answer:", else its last line)
and compares what matters for the kind: the last number, the sequence of numbers, or the
sequence of the puzzle's names.
"""

from __future__ import annotations

import itertools
import random
import re

from rewards.answers import after_answer_marker, last_answer_tag, last_boxed, last_number
from rewards.registry import RewardResult, pure_reward

NAMES = ("Ana", "Ben", "Cai", "Dev", "Eva", "Fay")
KINDS = ("chain", "sort", "order")
_CHAIN_STEPS = {
    "add": (lambda v, k: v + k, "add {k}"),
    "subtract": (lambda v, k: v - k, "subtract {k}"),
    "multiply": (lambda v, k: v * k, "multiply by {k}"),
}


def chain_puzzle(rng: random.Random) -> dict:
    """Start value and 2-4 operations; the answer is the value at the end."""
    value = rng.randint(1, 20)
    steps = [f"Start with {value}"]
    for _ in range(rng.randint(2, 4)):
        name = rng.choice(list(_CHAIN_STEPS))
        operand = rng.randint(2, 5) if name == "multiply" else rng.randint(1, 9)
        apply, text = _CHAIN_STEPS[name]
        value = apply(value, operand)
        steps.append(text.format(k=operand))
    return {"prompt": ", ".join(steps) + ". Result?", "answer": str(value), "kind": "chain"}


def sort_puzzle(rng: random.Random) -> dict:
    """4-6 distinct numbers below 100 to sort ascending."""
    numbers = rng.sample(range(100), rng.randint(4, 6))
    return {"prompt": "Sort ascending: " + " ".join(map(str, numbers)),
            "answer": " ".join(map(str, sorted(numbers))), "kind": "sort"}


def clue_holds(clue: tuple, position: dict[str, int]) -> bool:
    kind, x, y = clue
    if kind == "left_of":
        return position[x] < position[y]
    if kind == "next_to":
        return abs(position[x] - position[y]) == 1
    if kind == "at":
        return position[x] == y
    return position[x] != y  # "not_at"


def clue_text(clue: tuple) -> str:
    kind, x, y = clue
    if kind == "left_of":
        return f"{x} is left of {y}."
    if kind == "next_to":
        return f"{x} is next to {y}."
    return f"{x} is {'' if kind == 'at' else 'not '}in position {y + 1}."


def arrangements_satisfying(names: list[str], clues: list[tuple]) -> list[tuple[str, ...]]:
    """Every left-to-right order of `names` that satisfies all `clues`."""
    return [order for order in itertools.permutations(names)
            if all(clue_holds(c, {n: i for i, n in enumerate(order)}) for c in clues)]


def order_puzzle(rng: random.Random) -> dict:
    """A row of 3-4 people and clues true of one arrangement, added until it is the only one.

    Relational clues come first in random order and "X is in position k" clues last, so position
    clues appear only when relations cannot pin the order down; then every clue whose removal
    keeps the answer unique is dropped.
    """
    names = list(NAMES[: rng.randint(3, 4)])
    solution = names[:]
    rng.shuffle(solution)
    position = {n: i for i, n in enumerate(solution)}
    relational = [(k, x, y) for k in ("left_of", "next_to") for x in names for y in names if x != y]
    relational += [("not_at", x, i) for x in names for i in range(len(names))]
    candidates = [c for c in relational if clue_holds(c, position)]
    rng.shuffle(candidates)
    candidates += [("at", x, position[x]) for x in rng.sample(names, len(names))]
    clues: list[tuple] = []
    for clue in candidates:
        if len(arrangements_satisfying(names, clues)) == 1:
            break
        clues.append(clue)
    for clue in list(clues):
        fewer = [c for c in clues if c != clue]
        if len(arrangements_satisfying(names, fewer)) == 1:
            clues = fewer
    prompt = (f"{', '.join(names)} stand in a row, positions 1-{len(names)} from the left. "
              + " ".join(clue_text(c) for c in clues) + " Order from left?")
    return {"prompt": prompt, "answer": " ".join(solution), "kind": "order"}


def generate_puzzles(n: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """`n` puzzles, kinds cycling, as rows {"prompt", "answer", "domain": "logic", "kind"}."""
    rng = random.Random(seed)
    makers = {"chain": chain_puzzle, "sort": sort_puzzle, "order": order_puzzle}
    return [{**makers[kinds[i % len(kinds)]](rng), "domain": "logic"} for i in range(n)]


def final_answer_text(response: str) -> str:
    """Boxed, <answer> or "answer:" content, else the last non-empty line."""
    for finder in (last_boxed, last_answer_tag, after_answer_marker):
        found = finder(response)
        if found:
            return found
    lines = [line for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def puzzle_kind(sample: dict) -> str:
    """sample["kind"], else inferred from the answer's shape."""
    if "kind" in sample:
        return sample["kind"]
    tokens = str(sample["answer"]).split()
    if len(tokens) == 1 and re.fullmatch(r"-?\d+", tokens[0]):
        return "chain"
    return "sort" if all(re.fullmatch(r"-?\d+", t) for t in tokens) else "order"


def logic_answer_correct(kind: str, gold: str, answer: str) -> bool:
    """Compare what matters for `kind`: last number, number sequence, or sequence of gold names."""
    if kind == "chain":
        number = last_number(answer)
        return number is not None and re.fullmatch(r"-?\d+", number) is not None and int(number) == int(gold)
    if kind == "sort":
        return re.findall(r"-?\d+", answer) == gold.split()
    names = {n.lower() for n in gold.split()}
    said = [w.lower() for w in re.findall(r"[A-Za-z]+", answer) if w.lower() in names]
    return said == [n.lower() for n in gold.split()]


@pure_reward
def logic_reward(response: str, sample: dict) -> RewardResult:
    """1.0 when the response's final answer solves the puzzle in `sample`."""
    answer = final_answer_text(response)
    if not answer:
        return RewardResult(0.0, "empty response")
    return RewardResult(float(logic_answer_correct(puzzle_kind(sample), str(sample["answer"]), answer)))
