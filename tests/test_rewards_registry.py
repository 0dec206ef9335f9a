"""Reward registry: built-in names, user registration, import paths."""

import pytest

from rewards.registry import (
    BUILTIN_REWARDS,
    PURE_BUILTINS,
    RewardResult,
    available_rewards,
    get_reward,
    import_from_path,
    is_pure_reward,
    register_reward,
)


def test_every_builtin_name_resolves_to_a_working_reward():
    assert {"exact_match", "math_verify", "code_tests", "logic", "format", "length_penalty"} <= set(
        available_rewards())
    assert get_reward("exact_match")("Answer: 7", {"answer": "7"}).score == 1.0
    assert get_reward("math_verify")("\\boxed{0.5}", {"answer": "1/2"}).score == 1.0
    assert get_reward("logic")("Answer: 5", {"answer": "5"}).score == 1.0
    assert get_reward("format")("<think>x</think> 1", {}).score == 1.0
    assert get_reward("length_penalty")("x" * 10, {}, max_length=8, buffer=2) == -1.0
    assert callable(get_reward("code_tests"))


def test_user_rewards_by_decorator_and_by_import_path():
    @register_reward("test_registry_always_half")
    def always_half(response: str, sample: dict) -> float:
        return 0.5

    assert get_reward("test_registry_always_half") is always_half
    penalty = import_from_path("rewards.format.overlong_penalty")
    assert get_reward("rewards.format:overlong_penalty") is penalty
    assert get_reward("rewards.registry.RewardResult")(1.0) == RewardResult(1.0)


def test_unknown_rewards_fail_with_the_known_names():
    with pytest.raises(KeyError, match="math_verify"):
        get_reward("no_such_reward")
    with pytest.raises(ModuleNotFoundError):
        get_reward("no_such_module.fn")
    with pytest.raises(TypeError):
        get_reward("rewards.registry:BUILTIN_REWARDS")


def test_pure_marks_match_the_registry():
    assert {name for name in BUILTIN_REWARDS if is_pure_reward(get_reward(name))} == PURE_BUILTINS
    assert not is_pure_reward(get_reward("math_verify")) and not is_pure_reward(get_reward("code_tests"))

    @register_reward("test_registry_pure_half", pure=True)
    def pure_half(response: str, sample: dict) -> float:
        return 0.5

    @register_reward("test_registry_user_half")
    def user_half(response: str, sample: dict) -> float:
        return 0.5

    assert is_pure_reward(get_reward("test_registry_pure_half"))
    assert not is_pure_reward(get_reward("test_registry_user_half"))  # user rewards keep their worker by default
