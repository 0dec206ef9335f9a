"""keel's tokenizers: a checkpoint's own Hugging Face tokenizer behind one small interface, `Tokenizer`.

A tokenizer directory holds what transformers' AutoTokenizer reads (tokenizer.json, tokenizer_config.json with
the special tokens and maybe the chat template, chat_template.jinja) and maybe generation_config.json, whose
eos_token_id are stop tokens beside the tokenizer's EOS. Prompt encoding, stop tokens, response decoding and SFT
targets all go through `Tokenizer`.

The character tokenizer of the tiny tasks (`CharTokenizer`) is an ordinary tokenizer of that kind: a `tokenizers`
WordLevel model over single characters (ids 0, 1, 2 are <pad>, <bos>, <eos>, then one id per character), saved as
tokenizer.json + tokenizer_config.json like any other. Directories written before it, with a keel_tokenizer.json
(the alphabet) instead, still load: `Tokenizer.load` rebuilds the same ids from it.

Every way a tokenizer file can be wrong that keel detects is a TokenizerError whose message starts with the file's
path and names the field where there is one (`check_tokenizer_files`).
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
LEGACY_TOKENIZER_FILE = "keel_tokenizer.json"  # keel's own format before tokenizer.json: {"chars": ...}
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Any of these makes a directory a tokenizer directory.
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "tokenizer.model", "vocab.json", LEGACY_TOKENIZER_FILE)
SPECIALS = ("<pad>", "<bos>", "<eos>")
# Digits, letters, arithmetic and a little punctuation: what the generated tasks use.
DEFAULT_CHARS = string.digits + string.ascii_lowercase + "+-*/=()<>?:., |"


class TokenizerError(ValueError):
    """A tokenizer file keel cannot use; the message starts with the file's path."""


class Tokenizer:
    """A Hugging Face tokenizer (`hf`) as keel uses it.

    - `encode(text, bos=True)`: token ids, with the tokenizer's own special tokens (its BOS) when `bos`
      (`add_special_tokens=` is accepted too, as in transformers).
    - `decode(ids)`: the text of generated ids up to the first stop token, special tokens skipped.
    - `stop_ids`: the EOS token and generation_config.json's eos_token_id; `vocab_size`: one past the largest id.
    - `save(directory)`: tokenizer.json, tokenizer_config.json (chat template included) and generation_config.json.
    """

    def __init__(self, hf: Any, generation_config: dict | None = None, source: str = ""):
        self.hf, self.source = hf, source
        self.generation_config = dict(generation_config) if generation_config else None
        self.bos_id: int | None = hf.bos_token_id
        self.eos_id: int | None = hf.eos_token_id
        self.pad_id: int | None = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        extra = (self.generation_config or {}).get("eos_token_id")
        extra = extra if isinstance(extra, list) else [] if extra is None else [extra]
        self.stop_ids: list[int] = sorted({i for i in [self.eos_id, *extra]
                                           if isinstance(i, int) and not isinstance(i, bool)})
        self._vocab = hf.get_vocab()
        self.vocab_size: int = max(len(hf), max(self._vocab.values(), default=-1) + 1)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.hf, "chat_template", None)
        return template or None

    @property
    def vocab_file(self) -> Path | None:
        """The file that defines the vocabulary (for error messages), None for an in-memory tokenizer."""
        if not self.source:
            return None
        for name in (TOKENIZER_FILE, LEGACY_TOKENIZER_FILE, "tokenizer.model", "vocab.json", TOKENIZER_CONFIG_FILE):
            if (Path(self.source) / name).exists():
                return Path(self.source) / name
        return Path(self.source)

    @property
    def template_file(self) -> Path | None:
        """The file the chat template was read from (chat_template.jinja/.json or tokenizer_config.json)."""
        if not self.source:
            return None
        for name in (*CHAT_TEMPLATE_FILES, TOKENIZER_CONFIG_FILE):
            if (Path(self.source) / name).exists():
                return Path(self.source) / name
        return None

    def describe(self) -> str:
        return str(self.vocab_file) if self.source else "the character tokenizer"

    def encode(self, text: str, bos: bool = True, *, add_special_tokens: bool | None = None) -> list[int]:
        special = bos if add_special_tokens is None else add_special_tokens
        try:
            return list(self.hf.encode(text, add_special_tokens=special))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for an unknown token
            unknown = sorted({c for c in text if c not in self._vocab})
            if unknown:
                raise ValueError(f"characters {unknown!r} are not in the tokenizer's alphabet "
                                 f"({self.describe()})") from err
            raise ValueError(f"{self.describe()}: cannot encode {text[:80]!r}: {err}") from err

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of the ids up to the first stop token (not included); ids outside the vocabulary are skipped."""
        stops, kept = set(self.stop_ids), []
        for i in ids:
            if i in stops:
                break
            if 0 <= i < self.vocab_size:
                kept.append(int(i))
        return self.hf.decode(kept, skip_special_tokens=skip_special_tokens)

    def same_as(self, other: Tokenizer) -> bool:
        """Whether two tokenizers map text to the same ids and stop at the same ones."""
        return (self._vocab == other._vocab and self.stop_ids == other.stop_ids
                and self.chat_template == other.chat_template and self.bos_id == other.bos_id)

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))
        if self.generation_config:
            (Path(directory) / GENERATION_CONFIG_FILE).write_text(json.dumps(self.generation_config, indent=1))

    @staticmethod
    def load(directory: str | Path) -> Tokenizer:
        """The tokenizer of a directory: transformers' AutoTokenizer over its files (checked first, see
        `check_tokenizer_files`), or a keel_tokenizer.json of an older run. FileNotFoundError if it has none."""
        directory = Path(directory)
        if not any((directory / name).exists() for name in TOKENIZER_FILES if name != LEGACY_TOKENIZER_FILE):
            if (directory / LEGACY_TOKENIZER_FILE).exists():
                return _load_legacy(directory)
            raise FileNotFoundError(f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
        check_tokenizer_files(directory)
        hf = _auto_tokenizer(directory)
        generation = None
        if (directory / GENERATION_CONFIG_FILE).exists():
            generation = _read_object(directory / GENERATION_CONFIG_FILE)
        return Tokenizer(hf, generation, str(directory))


class CharTokenizer(Tokenizer):
    """The tiny tasks' tokenizer: ids 0, 1, 2 are <pad>, <bos>, <eos>; then one id per character of `chars`."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, chars: str = DEFAULT_CHARS):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be unique (and at least one)")
        self.chars = chars
        super().__init__(char_tokenizer(chars))

    @staticmethod
    def _with_generation_config(tokenizer: CharTokenizer, generation_config: dict) -> CharTokenizer:
        Tokenizer.__init__(tokenizer, tokenizer.hf, generation_config, tokenizer.source)
        return tokenizer


def char_tokenizer(chars: str = DEFAULT_CHARS):
    """A transformers tokenizer over single characters: a `tokenizers` WordLevel model, each character its own
    token (no unknown token: a character outside `chars` cannot be encoded), <bos> added in front by the post-
    processor, tokens joined back without spaces by the decoder."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for c in chars:
        vocab[c] = len(vocab)
    model = RustTokenizer(models.WordLevel(vocab, unk_token=None))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    model.decoder = decoders.Fuse()
    model.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def _load_legacy(directory: Path) -> CharTokenizer:
    path = directory / LEGACY_TOKENIZER_FILE
    payload = _read_object(path)
    chars = payload.get("chars")
    if not isinstance(chars, str) or not chars:
        raise TokenizerError(f"{path}: field 'chars' must be a non-empty string, got {chars!r}")
    specials = payload.get("specials", list(SPECIALS))
    if specials != list(SPECIALS):
        raise TokenizerError(f"{path}: field 'specials' must be {list(SPECIALS)}, got {specials!r}")
    try:
        tokenizer = CharTokenizer(chars)
    except ValueError as err:
        raise TokenizerError(f"{path}: field 'chars': {err}") from err
    tokenizer.source = str(directory)
    if (directory / GENERATION_CONFIG_FILE).exists():
        return CharTokenizer._with_generation_config(tokenizer, _read_object(directory / GENERATION_CONFIG_FILE))
    return tokenizer


# ---- checking tokenizer files ----------------------------------------------------------------------------

def _read_object(path: Path) -> dict:
    try:
        content = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from err
    except OSError as err:
        raise TokenizerError(f"{path}: cannot be read ({err})") from err
    if not isinstance(content, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


_NULLABLE_OBJECTS = ("truncation", "padding", "normalizer", "pre_tokenizer", "post_processor", "decoder")
_SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
# tokenizer_config.json fields transformers reads, by the JSON types it accepts (null is always allowed).
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "model_max_length": (int, float),
    **dict.fromkeys(("tokenizer_class", "backend", "padding_side", "truncation_side"), (str,)),
    **dict.fromkeys(("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "legacy", "add_prefix_space",
                     "split_special_tokens", "use_default_system_prompt", "do_lower_case"), (bool,)),
    "added_tokens_decoder": (dict,),
    "chat_template": (str, list),
    "model_input_names": (list,),
    "additional_special_tokens": (list,),
    "extra_special_tokens": (list, dict),
}


def _type_error(path: Path, key: str, expected: str, value: Any) -> TokenizerError:
    return TokenizerError(f"{path}: field '{key}' must be {expected}, got {json.dumps(value)[:80]}")


def _check_tokenizer_json(path: Path) -> None:
    content = _read_object(path)
    if not isinstance(content.get("model"), dict):
        raise _type_error(path, "model", "an object (the tokenization model)", content.get("model"))
    for key in _NULLABLE_OBJECTS:
        if content.get(key) is not None and not isinstance(content[key], dict):
            raise _type_error(path, key, "an object or null", content[key])
    if "version" in content and not isinstance(content["version"], str):
        raise _type_error(path, "version", "a string", content["version"])
    added = content.get("added_tokens", [])
    if not isinstance(added, list):
        raise _type_error(path, "added_tokens", "a list of tokens", added)
    for token in added:
        if not (isinstance(token, dict) and isinstance(token.get("content"), str)
                and isinstance(token.get("id"), int) and not isinstance(token.get("id"), bool)):
            raise _type_error(path, "added_tokens", 'a list of {"id": int, "content": str, ...}', token)
    from tokenizers import Tokenizer as RustTokenizer

    try:
        RustTokenizer.from_str(json.dumps(content))
    except Exception as err:  # noqa: BLE001 - tokenizers' errors are bare Exceptions
        raise TokenizerError(f"{path}: {_culprit_json(content, _rust_loads)}not a tokenizer the `tokenizers` "
                             f"library can read ({_one_line(err)})") from err


def _rust_loads(content: dict) -> bool:
    from tokenizers import Tokenizer as RustTokenizer

    try:
        RustTokenizer.from_str(json.dumps(content))
    except Exception:  # noqa: BLE001
        return False
    return True


def _culprit_json(content: dict, loads) -> str:
    """"field 'KEY': " for the first top-level field without which `loads` succeeds ('' if none does)."""
    for key in content:
        if loads({k: v for k, v in content.items() if k != key}):
            return f"field '{key}': "
    return ""


def _check_special_token(path: Path, key: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return
    raise _type_error(path, key, 'a token string or {"content": str, ...}', value)


def _check_tokenizer_config(path: Path) -> None:
    content = _read_object(path)
    for key in _SPECIAL_TOKEN_FIELDS:
        _check_special_token(path, key, content.get(key))
    for key, types in _CONFIG_TYPES.items():
        value = content.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _type_error(path, key, " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                                                       "bool": "true or false", "dict": "an object",
                                                       "list": "a list"}[t.__name__] for t in types), value)
    for token_id, token in (content.get("added_tokens_decoder") or {}).items():
        if not (str(token_id).isdigit() and isinstance(token, dict) and isinstance(token.get("content"), str)):
            raise _type_error(path, f"added_tokens_decoder.{token_id}", 'an id -> {"content": str, ...} entry', token)
    template = content.get("chat_template")
    if isinstance(template, list) and not all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                              for t in template):
        raise _type_error(path, "chat_template", 'a string or a list of {"name": str, "template": str}', template)


def check_tokenizer_files(directory: str | Path) -> None:
    """Read a tokenizer directory's JSON files as transformers will, and check the fields keel and transformers
    use (types, the vocabulary model, added tokens). A fault is a TokenizerError naming the file and field."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).exists():
        _check_tokenizer_json(directory / TOKENIZER_FILE)
    if (directory / TOKENIZER_CONFIG_FILE).exists():
        _check_tokenizer_config(directory / TOKENIZER_CONFIG_FILE)
    for name in ("special_tokens_map.json", "chat_template.json", "added_tokens.json"):
        if (directory / name).exists():
            _read_object(directory / name)


def _auto_tokenizer(directory: Path):
    """AutoTokenizer.from_pretrained, every failure (tokenizers' Rust panics included) a TokenizerError naming
    the file and, when leaving one field of tokenizer_config.json out makes it load, that field."""
    try:
        return _from_pretrained(directory)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - a pyo3 PanicException is a BaseException
        config = directory / TOKENIZER_CONFIG_FILE
        culprit = ""
        if config.exists():
            culprit = _culprit_json(_read_object(config), lambda fields: _loads_with_config(directory, fields))
        blamed = config if culprit or not (directory / TOKENIZER_FILE).exists() else directory / TOKENIZER_FILE
        raise TokenizerError(f"{blamed}: {culprit}transformers cannot load the tokenizer ({_one_line(err)})") from err


def _from_pretrained(directory: Path):
    """AutoTokenizer.from_pretrained, kept off the model's config.json when the tokenizer files say what they are
    (a tokenizer.json or a tokenizer_class): the model config is keel's to check, not the tokenizer's."""
    from transformers import AutoTokenizer, PretrainedConfig

    config = directory / TOKENIZER_CONFIG_FILE
    named = config.exists() and isinstance(_read_object(config).get("tokenizer_class"), str)
    if named or (directory / TOKENIZER_FILE).exists():
        return AutoTokenizer.from_pretrained(str(directory), config=PretrainedConfig())
    return AutoTokenizer.from_pretrained(str(directory))


def _loads_with_config(directory: Path, fields: dict) -> bool:
    """Whether the tokenizer of `directory` loads with tokenizer_config.json replaced by `fields`."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in directory.iterdir():
            if f.is_file() and f.name != TOKENIZER_CONFIG_FILE and not f.suffix == ".safetensors":
                shutil.copy(f, Path(tmp) / f.name)
        (Path(tmp) / TOKENIZER_CONFIG_FILE).write_text(json.dumps(fields))
        try:
            _from_pretrained(Path(tmp))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001
            return False
    return True


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
