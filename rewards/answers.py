"""Find the final answer in a free-form response.

Rule, first match wins: the content of the last `\\boxed{...}` (or `\\fbox{...}`), then the content
of the last `<answer>...</answer>`, then the rest of the line after the last "answer:" /
"answer is", then the last number in the text. Pure string functions, no math parsing here.
"""

from __future__ import annotations

import re

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_MARKER = re.compile(r"answer\s*(?:is|:|：)\s*:?\s*(.+)", re.IGNORECASE)
# Integers, decimals and simple fractions, with optional sign and thousands separators.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None when absent or unclosed."""
    start = max(text.rfind(opener) for opener in _BOX_OPENERS)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def last_answer_tag(text: str) -> str | None:
    """Content of the last `<answer>...</answer>` block."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def after_answer_marker(text: str) -> str | None:
    """What follows the last "answer:" / "answer is" on its line, without trailing full stop."""
    matches = _ANSWER_MARKER.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().rstrip(".").strip()
    return answer.strip("$").strip() or None


def last_number(text: str) -> str | None:
    """The last number written in `text`."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def extract_final_answer(text: str) -> str | None:
    """The final answer by the module rule, or None when the text holds none."""
    for finder in (last_boxed, last_answer_tag, after_answer_marker, last_number):
        found = finder(text)
        if found:
            return found
    return None
