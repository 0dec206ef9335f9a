"""Code reward with known answers: correct, wrong, slow and crashing programs, both test styles."""

import pytest

from rewards.code import code_tests_reward, extract_program, outputs_match, values_match
from rewards.sandbox import available_isolation, seccomp_module_dir

pytestmark = pytest.mark.skipif(available_isolation() == "plain" and seccomp_module_dir() is None,
                                reason="no sandbox here: needs Linux namespaces (root) or pyseccomp")

ADD_TESTS = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in [(1, 2), (3, 4), (10, 20), (0, 0)]]
ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
CALL_TESTS = [
    {"fn_name": "mean", "args": [[1, 2, 3, 4]], "expected": 2.5},
    {"fn_name": "mean", "args": [[0.1, 0.2]], "expected": 0.15},
    {"fn_name": "mean", "args": [], "kwargs": {"xs": [7]}, "expected": 7},
]


def test_extract_program_prefers_the_last_python_block():
    response = "First try:\n```python\nprint(1)\n```\nBetter:\n```python\nprint(2)\n```\n```text\nout\n```"
    assert extract_program(response) == "print(2)\n"
    assert extract_program("print(3)") == "print(3)"


def test_output_and_value_comparison_rules():
    assert outputs_match("3  \n4\n\n", "3\n4")
    assert not outputs_match("3\n4", "34")
    assert values_match([1, 0.30000000000000004], [1, 0.3])
    assert not values_match(1, True) and not values_match([1, 2], [1, 2, 3])


def test_correct_program_scores_one():
    response = f"Here you go:\n```python\n{ADD_PROGRAM}```"
    result = code_tests_reward(response, {"tests": ADD_TESTS})
    assert (result.score, result.reason) == (1.0, "")


def test_wrong_program_scores_the_fraction_passed():
    program = "a, b = map(int, input().split())\nprint(a * b)\n"  # right only for (0, 0)
    result = code_tests_reward(program, {"tests": ADD_TESTS})
    assert result.score == pytest.approx(1 / 4)
    assert result.reason == "1/4 tests passed; first failure test 0: wrong answer"
    assert code_tests_reward(program, {"tests": ADD_TESTS}, mode="all_pass").score == 0.0


def test_crashing_program_scores_zero_with_the_error():
    result = code_tests_reward("print(1 // 0)", {"tests": ADD_TESTS[:2]})
    assert result.score == 0.0
    assert "ZeroDivisionError" in result.reason and "runtime error" in result.reason


def test_slow_program_hits_the_per_test_time_limit():
    slow_on_big = "import time\na, b = map(int, input().split())\nif a > 5: time.sleep(30)\nprint(a + b)\n"
    result = code_tests_reward(slow_on_big, {"tests": ADD_TESTS, "time_limit_s": 1.0})
    assert result.score == pytest.approx(3 / 4)
    assert "test 2: wall time limit exceeded (1s)" in result.reason


def test_function_call_style_with_a_main_block_and_a_solution_class():
    function = "def mean(xs):\n    return sum(xs) / len(xs)\nif __name__ == '__main__':\n    input()\n"
    assert code_tests_reward(function, {"tests": CALL_TESTS}).score == 1.0
    method = "class Solution:\n    def mean(self, xs):\n        return sum(xs) / len(xs)\n"
    assert code_tests_reward(method, {"tests": CALL_TESTS}).score == 1.0
    wrong = "def mean(xs):\n    print('2.5')\n    return sum(xs) // len(xs)\n"
    result = code_tests_reward(wrong, {"tests": CALL_TESTS})
    assert result.score == pytest.approx(1 / 3) and "wrong answer" in result.reason


def test_tests_given_as_json_text_and_bad_arguments():
    import json

    assert code_tests_reward(ADD_PROGRAM, {"tests": json.dumps(ADD_TESTS[:1])}).score == 1.0
    with pytest.raises(ValueError):
        code_tests_reward(ADD_PROGRAM, {"tests": []})
    with pytest.raises(ValueError):
        code_tests_reward(ADD_PROGRAM, {"tests": ADD_TESTS}, mode="most")
