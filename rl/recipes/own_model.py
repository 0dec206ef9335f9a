"""A model and data of your own, built offline: the assets of README "Your own model and data" and of its tests.

    python -m rl.recipes.own_model runs/own-assets      # tokenizer/, model/, train.jsonl, test.jsonl

- `word_problems`: generated word problems ("Mia has 3 pens and gets 4 more. How many pens does Mia have now?"),
  the answer a number, the reference solution "3 + 4 = \\boxed{7}", and a data_source per row.
- `train_bpe_tokenizer`: a byte-level BPE tokenizer trained with the `tokenizers` library on text, wrapped as a
  transformers tokenizer with special tokens and, optionally, a chat template; saved as tokenizer.json +
  tokenizer_config.json (+ chat_template.jinja) like any Hugging Face tokenizer.
- `tiny_model`: the `tiny` preset (rl.model.presets) with the tokenizer's vocabulary size, saved with it.
- `transformers_checkpoint`: the same shapes written by transformers' `DeepseekV32ForCausalLM.save_pretrained`,
  with a tokenizer beside it (and no keel file), as a downloaded checkpoint would be.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ("Mia", "Tom", "Ana", "Leo", "Sam", "Ivy", "Max", "Zoe")
ITEMS = ("apples", "pens", "books", "coins", "cards", "shells")
# A ChatML-like template: <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>; <|end|> is EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
CHAT_SPECIALS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
# The DeepSeek-V3.2 layout's tokens (rollout/agent/deepseek_v32.py): a tokenizer without a chat template that has
# these gets keel's DeepSeek-V3.2 encoding in the chat format.
DEEPSEEK_SPECIALS = ("<｜▁pad▁｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                     "<think>", "</think>")


def word_problems(n: int, seed: int, max_number: int = 9) -> list[dict]:
    """Rows {prompt, answer, solution, data_source}: additions and subtractions of numbers up to max_number."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(0, max_number), rng.randint(0, max_number)
        if rng.random() < 0.5:
            prompt = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
            answer, solution, source = a + b, f"{a} + {b} = \\boxed{{{a + b}}}", "word_add"
        else:
            a, b = max(a, b), min(a, b)
            prompt = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
            answer, solution, source = a - b, f"{a} - {b} = \\boxed{{{a - b}}}", "word_sub"
        rows.append({"prompt": prompt, "answer": answer, "solution": solution, "data_source": source})
    return rows


def train_bpe_tokenizer(texts: list[str], vocab_size: int, specials: tuple[str, ...] = CHAT_SPECIALS,
                        chat_template: str | None = CHAT_TEMPLATE):
    """A transformers tokenizer: byte-level BPE trained on `texts`; specials[0:3] are pad, bos and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token=specials[0], bos_token=specials[1],
                                        eos_token=specials[2], clean_up_tokenization_spaces=False)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def corpus(rows: list[dict]) -> list[str]:
    return [f"{r['prompt']} {r['solution']}" for r in rows]


def model_fields(tokenizer, **overrides) -> dict:
    """The tiny preset's config fields with the tokenizer's vocabulary size and special token ids."""
    from rl.model.presets import preset

    return preset("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)


def tiny_model(directory: Path, tokenizer, seed: int = 0) -> Path:
    """A fresh tiny DSA-MoE model sized to the tokenizer, saved by keel with the tokenizer beside it."""
    from transformers import DeepseekV32Config

    from rl.model.checkpoint import build_model, save_checkpoint
    from rl.model.tokenizer import Tokenizer

    model = build_model(DeepseekV32Config(**model_fields(tokenizer)), seed=seed)
    return save_checkpoint(model, directory, tokenizer=Tokenizer(tokenizer))


def transformers_checkpoint(directory: Path, tokenizer, seed: int = 0) -> Path:
    """The tiny shapes as transformers writes them (DeepseekV32ForCausalLM.save_pretrained, its own
    generation_config.json), the tokenizer saved beside them by transformers: no keel file in the directory."""
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**model_fields(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def write_assets(out: Path, train_rows: int = 4000, test_rows: int = 200, vocab_size: int = 400,
                 seed: int = 0) -> dict[str, Path]:
    """tokenizer/, model/, train.jsonl and test.jsonl under `out` (test prompts never occur in train)."""
    out.mkdir(parents=True, exist_ok=True)
    test = word_problems(test_rows, seed + 1)
    held = {r["prompt"] for r in test}
    train = [r for r in word_problems(train_rows * 2, seed) if r["prompt"] not in held][:train_rows]
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "tokenizer": out / "tokenizer",
             "model": out / "model"}
    for name, rows in (("train", train), ("test", test)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_bpe_tokenizer(corpus(train), vocab_size)
    tokenizer.save_pretrained(paths["tokenizer"])
    tiny_model(paths["model"], tokenizer, seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="directory to write tokenizer/, model/, train.jsonl, test.jsonl into")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--test-rows", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_assets(args.out, args.train_rows, args.test_rows, args.vocab_size, args.seed)
    for name, path in paths.items():
        print(f"{name:>9}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
