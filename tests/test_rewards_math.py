"""Math rewards: answer extraction, math-verify equivalence, exact match, arithmetic generator."""

import re

import pytest

from rewards.answers import extract_final_answer
from rewards.math import exact_match_reward, generate_arithmetic, math_verify_reward, normalize_answer


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so the total is \\boxed{\\frac{3}{4}} apples", "\\frac{3}{4}"),
        ("\\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),
        ("<think>2+2</think><answer>4</answer>", "4"),
        ("Let me see.\nFinal answer: 12 cm.", "12 cm"),
        ("first 3, then 7, finally -2.5", "-2.5"),
        ("about 1,000 people", "1,000"),
        ("19", "19"),
        ("no digits here", None),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize(
    ("gold", "response"),
    [
        ("1/2", "The answer is \\boxed{\\frac{1}{2}}"),
        ("0.5", "answer: 1/2"),
        ("\\frac{2}{4}", "\\boxed{0.5}"),
        ("x+1", "\\boxed{1+x}"),
        ("\\sqrt{2}", "\\boxed{2^{1/2}}"),
        ("5", "Answer: 5 cm"),
        ("10\\%", "\\boxed{0.1}"),
        ("19", "19"),
    ],
)
def test_math_verify_accepts_equivalent_answers(gold, response):
    assert math_verify_reward(response, {"answer": gold}).score == 1.0


@pytest.mark.parametrize(
    ("gold", "response"),
    [
        ("1/2", "\\boxed{\\frac{1}{3}}"),
        ("x+1", "\\boxed{x-1}"),
        ("19", "18"),
        ("\\sqrt{2}", "\\boxed{2}"),
    ],
)
def test_math_verify_rejects_different_answers(gold, response):
    assert math_verify_reward(response, {"answer": gold}).score == 0.0


def test_math_verify_explains_a_missing_answer():
    result = math_verify_reward("I do not know", {"answer": "3"})
    assert result.score == 0.0
    assert result.reason == "no final answer found"


def test_exact_match_normalises_spelling_but_not_maths():
    assert normalize_answer(" $1,000$. ") == normalize_answer("1000")
    assert normalize_answer("0.50") == normalize_answer("\\frac{1}{2}")
    assert exact_match_reward("Answer: 0.50", {"answer": "1/2"}).score == 1.0
    assert exact_match_reward("\\boxed{x+1}", {"answer": "x + 1"}).score == 1.0
    # Exact match is the cheap check: equal values in different symbolic forms do not match.
    assert exact_match_reward("\\boxed{1+x}", {"answer": "x+1"}).score == 0.0
    assert exact_match_reward("42", {"answer": "24"}).score == 0.0


def test_generate_arithmetic_is_short_deterministic_and_correct():
    rows = generate_arithmetic(200, seed=3, max_operand=20)
    assert rows == generate_arithmetic(200, seed=3, max_operand=20)
    assert rows != generate_arithmetic(200, seed=4, max_operand=20)
    for row in rows:
        assert row["domain"] == "math"
        assert re.fullmatch(r"\d{1,2}[+*-]\d{1,2}=", row["prompt"])
        assert int(row["answer"]) == eval(row["prompt"][:-1]) >= 0
    assert {re.search(r"[+*-]", row["prompt"]).group() for row in rows} == set("+-*")


def test_arithmetic_rows_accept_a_bare_number_answer():
    row = generate_arithmetic(1, seed=0)[0]
    assert math_verify_reward(row["answer"], row).score == 1.0
    assert exact_match_reward(row["answer"], row).score == 1.0
    assert math_verify_reward(str(int(row["answer"]) + 1), row).score == 0.0
