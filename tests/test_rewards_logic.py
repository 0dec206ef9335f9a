"""Logic puzzles: generated answers are right and unique; the checker accepts and rejects."""

import itertools

import pytest

from rewards.logic import arrangements_satisfying, generate_puzzles, logic_reward


def test_puzzles_are_deterministic_and_cover_every_kind():
    rows = generate_puzzles(30, seed=7)
    assert rows == generate_puzzles(30, seed=7)
    assert rows != generate_puzzles(30, seed=8)
    assert {row["kind"] for row in rows} == {"chain", "sort", "order"}
    assert all(row["domain"] == "logic" and row["prompt"] and row["answer"] for row in rows)


def test_chain_answers_follow_the_steps():
    for row in generate_puzzles(60, seed=1, kinds=("chain",)):
        steps = row["prompt"].removesuffix(". Result?").split(", ")
        value = int(steps[0].removeprefix("Start with "))
        for step in steps[1:]:
            op, operand = step.rsplit(" ", 1)
            value = {"add": value + int(operand), "subtract": value - int(operand),
                     "multiply by": value * int(operand)}[op]
        assert row["answer"] == str(value)


def test_sort_answers_are_sorted_inputs():
    for row in generate_puzzles(60, seed=2, kinds=("sort",)):
        numbers = [int(x) for x in row["prompt"].removeprefix("Sort ascending: ").split()]
        assert [int(x) for x in row["answer"].split()] == sorted(numbers)


def test_order_puzzles_have_exactly_one_solution():
    for row in generate_puzzles(60, seed=3, kinds=("order",)):
        names = row["prompt"].split(" stand in a row")[0].split(", ")
        clue_text = row["prompt"].split("from the left. ")[1].removesuffix(" Order from left?")
        # Re-derive the solutions from the prompt's own words, independently of the generator.
        solutions = [order for order in itertools.permutations(names)
                     if all(sentence_holds(s, order) for s in clue_text.split(". ") if s)]
        assert solutions == [tuple(row["answer"].split())]
    assert arrangements_satisfying(["A", "B"], [("left_of", "A", "B")]) == [("A", "B")]


def sentence_holds(sentence: str, order: tuple[str, ...]) -> bool:
    words = sentence.rstrip(".").split()
    pos = {n: i for i, n in enumerate(order)}
    if "left" in words:
        return pos[words[0]] < pos[words[-1]]
    if "next" in words:
        return abs(pos[words[0]] - pos[words[-1]]) == 1
    at = pos[words[0]] == int(words[-1]) - 1
    return not at if "not" in words else at


@pytest.mark.parametrize(
    ("kind", "answer", "right", "wrong"),
    [
        ("chain", "14", "4 + 3 = 7, times 2 is 14", "The result is 15."),
        ("chain", "-3", "Answer: -3", "\\boxed{3}"),
        ("sort", "3 12 49", "Sorted: 3, 12, 49", "Answer: 12 3 49"),
        ("order", "Ben Ana Cai", "From the left: Ben, Ana, Cai.", "Answer: Ana, Ben, Cai"),
        ("order", "Ben Ana Cai", "<answer>ben ana cai</answer>", "<answer>Ben Ana</answer>"),
    ],
)
def test_logic_reward_checks_what_matters_for_the_kind(kind, answer, right, wrong):
    sample = {"answer": answer, "kind": kind, "domain": "logic"}
    assert logic_reward(right, sample).score == 1.0
    assert logic_reward(wrong, sample).score == 0.0
    # Without "kind" the checker infers it from the answer's shape.
    assert logic_reward(right, {"answer": answer}).score == 1.0


def test_logic_reward_explains_an_empty_response():
    result = logic_reward("   \n", {"answer": "3", "kind": "chain"})
    assert (result.score, result.reason) == (0.0, "empty response")
