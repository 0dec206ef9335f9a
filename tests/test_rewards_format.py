"""Format reward and the over-length penalty."""

import pytest

from rewards.format import format_reward, length_penalty_reward, overlong_penalty


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("<think>add them</think> 19", 1.0),
        ("\n<think>a\nb</think>\nThe answer is 3", 1.0),
        ("19", 0.0),
        ("<think>x</think>", 0.0),
        ("<think> </think> 19", 0.0),
        ("preamble <think>x</think> 19", 0.0),
        ("<think>x</think><think>y</think> 19", 0.0),
        ("<think>x 19", 0.0),
    ],
)
def test_format_reward_thinking_then_answer(response, score):
    result = format_reward(response, {})
    assert result.score == score
    assert bool(result.reason) == (score == 0.0)


def test_format_reward_with_answer_tags():
    assert format_reward("<think>x</think><answer>4</answer>", {}, answer_tag="answer").score == 1.0
    assert format_reward("<think>x</think>4", {}, answer_tag="answer").score == 0.0
    assert format_reward("<think>x</think><answer>4</answer> more", {}, answer_tag="answer").score == 0.0
    assert format_reward("<think>x</think><answer> </answer>", {}, answer_tag="answer").score == 0.0


def test_overlong_penalty_is_zero_then_linear_then_minus_one():
    assert overlong_penalty(50, max_length=100, buffer=20) == 0.0
    assert overlong_penalty(80, max_length=100, buffer=20) == 0.0
    assert overlong_penalty(90, max_length=100, buffer=20) == pytest.approx(-0.5)
    assert overlong_penalty(100, max_length=100, buffer=20) == -1.0
    assert overlong_penalty(500, max_length=100, buffer=20) == -1.0


def test_length_penalty_counts_chars_or_words():
    response = "word " * 30
    assert length_penalty_reward(response, {}, max_length=100, buffer=20) == -1.0
    assert length_penalty_reward(response, {}, max_length=100, buffer=20, unit="words") == 0.0
    with pytest.raises(ValueError):
        length_penalty_reward(response, {}, unit="tokens")
