"""How a dataset row becomes the token ids the engine samples from and the trainer trains on (`data.format`).

raw   the prompt string, encoded with the tokenizer's own special tokens (its BOS, if it adds one).
chat  the row as a conversation (`data.system_prompt`, then the user's prompt, or the row's `messages`) rendered
      with the tokenizer's chat template and its generation prompt; a tokenizer without a chat template gets the
      DeepSeek-V3.2 encoding (`rollout/agent/deepseek_v32.py`), thinking or not (`data.thinking`).

A row's prompt ids are computed once and are exactly what the engine receives and the trainer scores. An SFT
sample is the same prompt ids followed by the reference response as the format renders the assistant's turn,
ending with a stop token, so the warm start, the rollouts and the trainer see one tokenization of every prompt.
"""

from __future__ import annotations

from typing import Any

from rl.model.tokenizer import Tokenizer
from rollout.agent.deepseek_v32 import BOS as DSV32_BOS
from rollout.agent.deepseek_v32 import EOS as DSV32_EOS
from rollout.agent.deepseek_v32 import DeepSeekV32Template
from rollout.agent.messages import Message

FORMATS = ("raw", "chat")
ENCODINGS = ("auto", "tokenizer", "deepseek_v32")
PROBE = [{"role": "user", "content": "What is 1+1?"}]


class FormatError(ValueError):
    """A prompt format the tokenizer cannot serve; the message starts with the tokenizer or template file."""


class PromptFormat:
    """`data.format` over a tokenizer: `prompt_ids(row)`, `response_ids(row, text)` (an SFT target), `prompt_text`.

    `encoding` is "raw", "tokenizer" (the chat template) or "deepseek_v32". Building one renders a probe
    conversation, so a chat template that does not render fails here, before any engine starts.
    """

    def __init__(self, tokenizer: Tokenizer, fmt: str = "raw", system_prompt: str = "", thinking: bool = False,
                 encoding: str = "auto"):
        if fmt not in FORMATS:
            raise FormatError(f"data.format={fmt!r}: choose one of {list(FORMATS)}")
        if encoding not in ENCODINGS:
            raise FormatError(f"data.chat_encoding={encoding!r}: choose one of {list(ENCODINGS)}")
        self.tokenizer, self.system_prompt, self.thinking = tokenizer, system_prompt, thinking
        if fmt == "raw":
            self.encoding = "raw"
        elif encoding == "auto":
            self.encoding = "tokenizer" if tokenizer.chat_template else "deepseek_v32"
        else:
            self.encoding = encoding
        self.template = DeepSeekV32Template(thinking=thinking) if self.encoding == "deepseek_v32" else None
        if self.encoding == "tokenizer" and not tokenizer.chat_template:
            raise FormatError(f"{tokenizer.describe()}: data.chat_encoding=tokenizer, but the tokenizer has no chat "
                              "template")
        if self.encoding == "deepseek_v32":
            problem = deepseek_v32_problem(tokenizer)
            if problem:
                raise FormatError(f"{tokenizer.describe()}: {problem}")
        if self.encoding != "raw":
            self.render(self.messages({"messages": PROBE}), True)

    @classmethod
    def of(cls, data: Any, tokenizer: Tokenizer) -> PromptFormat:
        """From the run config's `data` section."""
        return cls(tokenizer, data.format, data.system_prompt, data.thinking, data.chat_encoding)

    @property
    def chat(self) -> bool:
        return self.encoding != "raw"

    def messages(self, row: dict) -> list[dict]:
        """The row's conversation: its `messages`, or its prompt as the user's message; the system prompt first."""
        messages = row.get("messages")
        messages = list(messages) if messages is not None else [{"role": "user", "content": row["prompt"]}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.template is not None:
            return self.template.render([Message(m["role"], m["content"]) for m in messages], add_generation_prompt)
        try:
            text = self.tokenizer.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                         tokenize=False, enable_thinking=self.thinking,
                                                         thinking=self.thinking)
        except Exception as err:  # noqa: BLE001 - jinja2's TemplateError, or what the template raises itself
            where = self.tokenizer.template_file or self.tokenizer.describe()
            raise FormatError(f"{where}: the chat template fails to render a conversation of roles "
                              f"{[m['role'] for m in messages]}: {type(err).__name__}: {err}") from None
        if not isinstance(text, str):
            raise FormatError(f"{self.tokenizer.template_file}: the chat template rendered {type(text).__name__}, "
                              "not text")
        return text

    def prompt_text(self, row: dict) -> str:
        return self.render(self.messages(row), True) if self.chat else row["prompt"]

    def prompt_ids(self, row: dict) -> list[int]:
        """The ids the engine samples from: the rendered conversation with the generation prompt (chat), or the
        prompt with the tokenizer's special tokens (raw)."""
        if not self.chat:
            return self.tokenizer.encode(row["prompt"], bos=True)
        return self.tokenizer.encode(self.prompt_text(row), add_special_tokens=False)

    def response_ids(self, row: dict, response: str) -> list[int]:
        """The ids of `response` as the model should generate them after `prompt_ids(row)`, through a stop token:
        in the chat format what the template adds for the assistant's turn (its end-of-turn token, and in the
        thinking encoding an empty reasoning first), in the raw format the text and EOS."""
        stop = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.stop_ids[0]
        if not self.chat:
            return self.tokenizer.encode(response, bos=False) + [stop]
        messages = self.messages(row)
        prompt = self.render(messages, True)
        full = self.render([*messages, {"role": "assistant", "content": response}], False)
        suffix = full[len(prompt):] if full.startswith(prompt) else response
        ids = self.tokenizer.encode(suffix, add_special_tokens=False)
        stops = set(self.tokenizer.stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        return ids[: end + 1] if end is not None else ids + [stop]


def deepseek_v32_problem(tokenizer: Tokenizer) -> str | None:
    """Why the DeepSeek-V3.2 encoding cannot be used with this tokenizer (None: it can): its begin- and
    end-of-sentence strings must be single tokens, the latter a stop token."""
    for text, role in ((DSV32_BOS, "begin"), (DSV32_EOS, "end")):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except ValueError:  # characters the tokenizer cannot encode at all (the character tokenizer)
            ids = []
        if len(ids) != 1 or (role == "end" and ids[0] not in tokenizer.stop_ids):
            what = (f"is {len(ids) or 'no'} tokens" if len(ids) != 1
                    else f"is token {ids[0]}, not a stop token {tokenizer.stop_ids}")
            return (f"the tokenizer has no chat template, and the DeepSeek-V3.2 encoding keel uses instead needs "
                    f"{text!r} as one token{' and as EOS' if role == 'end' else ''} (it {what}); give the tokenizer "
                    "a chat template or use data.format=raw")
    return None


def supports_chat(tokenizer: Tokenizer) -> bool:
    return bool(tokenizer.chat_template) or deepseek_v32_problem(tokenizer) is None
