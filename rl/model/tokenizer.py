"""A character-level tokenizer for the tiny tasks; saved beside the checkpoint as keel_tokenizer.json."""

from __future__ import annotations

import json
import string
from pathlib import Path

TOKENIZER_FILE = "keel_tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>")
# Digits, letters, arithmetic and a little punctuation: what the generated tasks use.
DEFAULT_CHARS = string.digits + string.ascii_lowercase + "+-*/=()<>?:., |"


class CharTokenizer:
    """ids 0, 1, 2 are <pad>, <bos>, <eos>; then one id per character."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be unique")
        self.chars = chars
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise ValueError(f"characters {unknown!r} are not in the tokenizer's alphabet {self.chars!r}")
        return ([self.bos_id] if bos else []) + [self._ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; stops at <eos>, skips <pad>/<bos>."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(SPECIALS) and i < self.vocab_size:
                out.append(self.chars[i - len(SPECIALS)])
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        payload = {"type": "char", "specials": list(SPECIALS), "chars": self.chars}
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps(payload, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}: is this a keel tiny-model checkpoint?")
        payload = json.loads(path.read_text())
        return cls(payload["chars"])
