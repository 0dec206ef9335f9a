"""Math rewards: the final answer checked by math-verify, or by normalised exact match.

Also a tiny arithmetic task generator ("12+7=" -> "19") for the quickstart and for tests.
math-verify's own timeouts use SIGALRM, which only works in a main thread; they are switched off
here (`parsing_timeout=None`, `timeout_seconds=None`) because the scoring layer runs every reward
under a hard, process-level deadline instead.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from math_verify import parse, verify

from rewards.answers import extract_final_answer
from rewards.registry import RewardResult, pure_reward

_NUMERIC = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")


def as_latex(answer: str) -> str:
    """Wrap a bare answer in $...$ so math-verify's LaTeX extractor sees all of it."""
    return answer if "$" in answer or "\\boxed" in answer else f"${answer}$"


def answers_equivalent(gold: str, predicted: str) -> bool:
    """True when math-verify finds `predicted` mathematically equal to `gold`.

    math-verify handles symbolic equivalence, fractions vs decimals, percentages and units.
    Raises ValueError when the gold answer itself cannot be parsed (a data error, not a miss).
    """
    gold_parsed = parse(as_latex(gold), parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold!r}")
    predicted_parsed = parse(as_latex(predicted), parsing_timeout=None)
    return bool(predicted_parsed) and verify(gold_parsed, predicted_parsed, timeout_seconds=None)


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: no $, spaces, trailing stop, thousands commas or \\frac; numbers exact."""
    text = answer.strip().lstrip("$ ").rstrip("$. ").lower()
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    text = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", text)
    text = re.sub(r"\s+", "", text)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    if _NUMERIC.fullmatch(text):
        # Fraction gives 0.50 == 1/2 == .5 one spelling.
        return str(Fraction(text))
    return text


@pure_reward
def exact_match_reward(response: str, sample: dict) -> RewardResult:
    """1.0 when the extracted final answer equals sample["answer"] after `normalize_answer`."""
    predicted = extract_final_answer(response)
    if predicted is None:
        return RewardResult(0.0, "no final answer found")
    return RewardResult(float(normalize_answer(predicted) == normalize_answer(str(sample["answer"]))))


def math_verify_reward(response: str, sample: dict) -> RewardResult:
    """1.0 when the extracted final answer is equivalent to sample["answer"] by math-verify."""
    predicted = extract_final_answer(response)
    if predicted is None:
        return RewardResult(0.0, "no final answer found")
    return RewardResult(float(answers_equivalent(str(sample["answer"]), predicted)))


def generate_arithmetic(n: int, seed: int, max_operand: int = 20) -> list[dict]:
    """`n` rows {"prompt": "a+b=", "answer": "c", "domain": "math"} with +, - (never negative), *."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-*")
        if op == "-" and b > a:
            a, b = b, a
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"prompt": f"{a}{op}{b}=", "answer": str(result), "domain": "math"})
    return rows
