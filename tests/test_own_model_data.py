"""Your own model and data, without an engine: Hugging Face tokenizers (the character tokenizer is one of them, and
old keel_tokenizer.json directories still load), the raw and chat formats (the tokenizer's chat template, or the
DeepSeek-V3.2 encoding), dataset files (jsonl, parquet, a `datasets` save_to_disk directory) checked row by row,
rewards picked by data source, the length budget, hub ids through the local cache, and every bad input stopping
`keel train` / `keel eval` before Ray or an engine starts, naming the file and what is wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import DeepseekV32Config

from rl.algo.batch import make_rollout_batch, rollout_schema
from rl.cli import main
from rl.loop.config import ConfigError, load_config
from rl.loop.data import DataError, DataKeys, load_dataset
from rl.loop.driver import Run
from rl.loop.formats import FormatError, PromptFormat
from rl.model.checkpoint import CheckpointError, build_model, check_checkpoint, load_tokenizer, save_checkpoint
from rl.model.hub import resolve_checkpoint
from rl.model.tokenizer import LEGACY_TOKENIZER_FILE, TOKENIZER_FILE, CharTokenizer, Tokenizer
from rl.recipes.evaluate import pass_at_k, pass_ks
from rl.recipes.own_model import (
    DEEPSEEK_SPECIALS,
    corpus,
    model_fields,
    train_bpe_tokenizer,
    word_problems,
)
from rollout.agent.deepseek_v32 import ASSISTANT, THINK_END, THINK_START

ROWS = word_problems(200, seed=0)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer with a chat template, trained offline on word problems."""
    return train_bpe_tokenizer(corpus(ROWS), vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe) -> Path:
    """A tiny DSA-MoE checkpoint sized to the BPE tokenizer, the tokenizer beside it."""
    path = tmp_path_factory.mktemp("own") / "model"
    save_checkpoint(build_model(DeepseekV32Config(**model_fields(bpe)), seed=0), path, tokenizer=Tokenizer(bpe))
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    train, test = d / "train.jsonl", d / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:150]))
    test.write_text("".join(json.dumps(r) + "\n" for r in ROWS[150:]))
    return {"train": train, "test": test, "dir": d}


def own_config(model_dir: Path, data_files: dict, *extra: str):
    return load_config(Path(__file__).parent.parent / "configs" / "own_model.yaml", [
        f"model.checkpoint={model_dir}", f"data.task={data_files['train']}", f"data.eval_task={data_files['test']}",
        f"run.output_dir={data_files['dir'] / 'runs'}", "rollout.engine.max_model_len=128", *extra])


# ---- tokenizers -------------------------------------------------------------------------------------------


def test_the_character_tokenizer_is_a_hugging_face_tokenizer_with_the_old_ids(tmp_path):
    tok = CharTokenizer()
    assert tok.encode("1+2=") == [1, 4, 39, 5, 43] and tok.encode("1+2=", bos=False) == [4, 39, 5, 43]
    assert tok.vocab_size == 54 and tok.stop_ids == [2] and CharTokenizer.bos_id == tok.bos_id == 1
    assert tok.decode([4, 39, 0, 1, 5, 60, 2, 6]) == "1+2"  # stops at <eos>; <pad>, <bos>, ids past the vocab skipped
    with pytest.raises(ValueError, match=r"\['H'\] are not in the tokenizer's alphabet"):
        tok.encode("Hi")
    tok.save(tmp_path)
    assert (tmp_path / TOKENIZER_FILE).exists() and not (tmp_path / LEGACY_TOKENIZER_FILE).exists()
    loaded = Tokenizer.load(tmp_path)
    assert type(loaded) is Tokenizer and loaded.same_as(tok) and loaded.encode("a b.") == tok.encode("a b.")


def test_an_old_run_directory_with_keel_tokenizer_json_still_loads(tmp_path):
    (tmp_path / LEGACY_TOKENIZER_FILE).write_text(json.dumps({"type": "char", "specials": ["<pad>", "<bos>", "<eos>"],
                                                             "chars": "0123456789+="}))
    tok = Tokenizer.load(tmp_path)
    assert tok.encode("12+3=") == [1, 4, 5, 13, 6, 14] and tok.decode([4, 13, 2]) == "1+"
    (tmp_path / LEGACY_TOKENIZER_FILE).write_text(json.dumps({"chars": 5}))
    with pytest.raises(ValueError, match=f"{LEGACY_TOKENIZER_FILE}: field 'chars'"):
        Tokenizer.load(tmp_path)


def test_an_old_run_resumes_with_its_keel_tokenizer(tmp_path):
    """A run directory written before tokenizer.json: base/ holds keel_tokenizer.json and the run uses it."""
    base = tmp_path / "base"
    save_checkpoint(build_model(DeepseekV32Config(**model_fields(CharTokenizer().hf)), seed=0), base)
    (base / LEGACY_TOKENIZER_FILE).write_text(json.dumps({"chars": "0123456789+="}))
    cfg = load_config(None, ["data.train_size=8", "data.eval_size=4", "data.max_operand=9"])
    run = Run(cfg, tmp_path)
    assert run.tokenizer.encode("1+2=") == [1, 4, 13, 5, 14]  # the old alphabet's ids, not DEFAULT_CHARS'


@pytest.mark.parametrize("content", ['{"chars": "01', '[1, 2]', '{"chars": 5}', '{"chars": ""}', '{"chars": "0110"}',
                                     '{"chars": "01", "specials": ["<s>"]}'])
def test_a_broken_keel_tokenizer_json_is_a_checkpoint_error_naming_it(tmp_path, content):
    save_checkpoint(build_model(DeepseekV32Config(**model_fields(CharTokenizer().hf)), seed=0), tmp_path / "m")
    (tmp_path / "m" / LEGACY_TOKENIZER_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'm' / LEGACY_TOKENIZER_FILE}: "):
        check_checkpoint(tmp_path / "m")


def test_stop_ids_are_eos_and_generation_config_eos(model_dir, tmp_path, bpe):
    shutil.copytree(model_dir, tmp_path / "m")
    eos, user = bpe.eos_token_id, bpe.convert_tokens_to_ids("<|user|>")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, user]}))
    tok = load_tokenizer(tmp_path / "m", vocab_size=len(bpe))
    assert tok.stop_ids == sorted({eos, user})
    ids = tok.encode("3 + 4 = 7", add_special_tokens=False)
    assert tok.decode([*ids, user, *ids]) == "3 + 4 = 7"
    out = tmp_path / "copy"
    save_checkpoint(build_model(DeepseekV32Config(**model_fields(bpe)), seed=0), out, tokenizer=tok)
    assert load_tokenizer(out).stop_ids == tok.stop_ids  # a saved checkpoint keeps the stop tokens


# ---- formats: the ids the engine samples from are the ids the trainer trains on -----------------------------


def test_chat_format_is_the_tokenizers_chat_template_with_the_generation_prompt(bpe):
    tok = Tokenizer(bpe)
    form = PromptFormat(tok, "chat", system_prompt="Answer in \\boxed{}.")
    row = {"prompt": ROWS[0]["prompt"]}
    messages = [{"role": "system", "content": "Answer in \\boxed{}."}, {"role": "user", "content": row["prompt"]}]
    expected = bpe.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert form.encoding == "tokenizer" and form.prompt_ids(row) == list(expected)
    response = form.response_ids(row, "3 + 4 = \\boxed{7}")
    assert response[-1] == tok.eos_id and tok.eos_id not in response[:-1]
    full = bpe.apply_chat_template([*messages, {"role": "assistant", "content": "3 + 4 = \\boxed{7}"}], tokenize=False)
    assert bpe.decode(form.prompt_ids(row) + response) == full
    chat_rows = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                              {"role": "user", "content": "2 + 2?"}]}
    assert form.prompt_text(chat_rows).endswith("<|user|>2 + 2?<|end|><|assistant|>")


def test_raw_format_is_the_prompt_with_the_tokenizers_special_tokens():
    tok = CharTokenizer()
    form = PromptFormat(tok, "raw")
    assert form.prompt_ids({"prompt": "1+2="}) == tok.encode("1+2=")
    assert form.response_ids({"prompt": "1+2="}, "3") == [6, 2]


@pytest.fixture(scope="module")
def deepseek_tokenizer():
    """A tokenizer with DeepSeek-V3.2's special tokens and no chat template: keel's V3.2 encoding applies."""
    return train_bpe_tokenizer(corpus(ROWS), 320, specials=DEEPSEEK_SPECIALS, chat_template=None)


@pytest.mark.parametrize("thinking", [False, True])
def test_without_a_chat_template_the_chat_format_is_the_deepseek_v32_encoding(deepseek_tokenizer, thinking):
    tok = Tokenizer(deepseek_tokenizer)
    form = PromptFormat(tok, "chat", thinking=thinking)
    text = form.prompt_text({"prompt": "Mia has 2 pens."})
    assert form.encoding == "deepseek_v32"
    assert text.endswith(ASSISTANT + (THINK_START if thinking else THINK_END))
    response = form.response_ids({"prompt": "Mia has 2 pens."}, "\\boxed{2}")
    assert response[-1] in tok.stop_ids
    think_end = deepseek_tokenizer.convert_tokens_to_ids(THINK_END)
    assert (response[0] == think_end) == thinking  # thinking: an empty reasoning closed first


def test_prompt_task_hands_the_engine_the_ids_it_trains_on(model_dir, data_files, monkeypatch):
    """Both formats: the ids given to the engine for a prompt are the prompt part of its SFT sample, and the batch
    the trainer gets holds them unchanged."""
    import rewards.scoring

    monkeypatch.setattr(rewards.scoring, "score_responses", lambda responses, rows, specs, **_: [
        rewards.scoring.RewardResult(1.0) for _ in responses])
    for fmt in ("raw", "chat"):
        run = Run(own_config(model_dir, data_files, f"data.format={fmt}",
                             *(["data.system_prompt=''"] if fmt == "raw" else [])), data_files["dir"])
        task, seen = run.task, []

        class Client:
            version = 0  # the weight version the engines hold

            def generate(self, prompts, sampling, policy_version, seen=seen):
                seen.extend(prompts)
                return make_rollout_batch([
                    dict(prompt_index=i, sample_index=0, prompt_ids=p, response_ids=[5, 6], rollout_logprobs=[0, 0],
                         finish_reason="stop", policy_version=0) for i, p in enumerate(prompts)],
                    rollout_schema(1, 2, 8))

        batch, _, _ = task.rollout(Client(), [3, 7], run.sampling(1), 0)
        input_ids, _, loss_mask = task.sft_tensors([3, 7])
        for j, i in enumerate((3, 7)):
            prompt = task.format.prompt_ids(task.train_set.take([i]).to_pylist()[0])
            assert seen[j] == prompt == batch.column("prompt_ids")[j].as_py()
            assert input_ids[j, : len(prompt)].tolist() == prompt and loss_mask[j, : len(prompt) - 1].sum() == 0
        if fmt == "chat":
            assert task.tokenizer.hf.decode(seen[0]).startswith("<|bos|><|system|>")


# ---- dataset files ----------------------------------------------------------------------------------------


def test_jsonl_parquet_and_a_datasets_directory_load_the_same_rows(tmp_path, data_files):
    rows = load_dataset(str(data_files["train"]), 0, 0)
    pq.write_table(pa.Table.from_pylist(ROWS[:150]), tmp_path / "train.parquet")
    saved = tmp_path / "saved"  # what `datasets` save_to_disk writes: Arrow IPC streams listed in state.json
    saved.mkdir()
    table = pa.Table.from_pylist(ROWS[:150])
    for k, part in enumerate((table.slice(0, 100), table.slice(100))):
        with pa.OSFile(str(saved / f"data-0000{k}-of-00002.arrow"), "wb") as f, pa.ipc.new_stream(f, part.schema) as w:
            w.write_table(part)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": f"data-0000{k}-of-00002.arrow"}
                                                                  for k in range(2)]}))
    for other in (tmp_path / "train.parquet", saved):
        assert load_dataset(str(other), 0, 0).to_pylist() == rows.to_pylist()
    assert rows.column("answer").type == pa.string() and rows.column("data_source")[0].as_py() == ROWS[0]["data_source"]
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match="DatasetDict with splits"):
        load_dataset(str(tmp_path / "dict"), 0, 0)


def test_configurable_columns_chat_messages_and_dotted_keys(tmp_path):
    path = tmp_path / "verl.jsonl"
    path.write_text(json.dumps({"question": [{"role": "user", "content": "2+2?"}], "data_source": "gsm8k",
                                "reward_model": {"ground_truth": "4", "style": "rule"}}) + "\n")
    keys = DataKeys(messages="question", answer="reward_model.ground_truth")
    table = load_dataset(str(path), 0, 0, keys=keys, chat=True)
    assert table.column("messages")[0].as_py() == [{"role": "user", "content": "2+2?"}]
    assert table.column("answer")[0].as_py() == "4" and "reward_model" in table.column_names
    with pytest.raises(DataError, match="holds chats, which need data.format=chat"):
        load_dataset(str(path), 0, 0, keys=keys, chat=False)
    # verl's parquet layout: the chat in `prompt`, the answer in reward_model.ground_truth
    verl = {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "1+1?"}],
            "reward_model": {"ground_truth": "2", "style": "rule"}}
    pq.write_table(pa.Table.from_pylist([verl]), tmp_path / "verl.parquet")
    table = load_dataset(str(tmp_path / "verl.parquet"), 0, 0, chat=True,
                         keys=DataKeys(messages="prompt", answer="reward_model.ground_truth"))
    row = table.to_pylist()[0]
    assert row["messages"] == [{"role": "user", "content": "1+1?"}] and row["answer"] == "2"
    assert row["data_source"] == "openai/gsm8k"


@pytest.mark.parametrize("content, problem", [
    ('{"prompt": "a"}\n', "no column 'answer' \\(data.answer_key\\)"),
    ('{"question": "a", "answer": 1}\n', "no column 'prompt' \\(data.prompt_key\\) or 'messages'"),
    ('{"prompt": "a", "answer": 1}\n{"prompt": 5, "answer": 2}\n', "row 1: column 'prompt' must be a string, got int"),
    ('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": [2]}\n', "row 1: column 'answer' must be a string or a"),
    ('{"prompt": "a", "answer": null}\n', "row 0: column 'answer' is missing"),
    ('{"prompt": " ", "answer": 1}\n', "row 0: column 'prompt' is an empty string"),
    ('{"prompt": "a", "answer": 1, "tests": [1]}\n{"prompt": "b", "answer": 2, "tests": "x"}\n',
     "row 1: column 'tests' holds str"),
    ('{"prompt": "a", "answer": 1, "data_source": 7}\n', "row 0: column 'data_source' must be a string"),
    ('{"prompt": "a", "answer": 1}\n{"prompt": "b",\n', "line 2: not valid JSON"),
    ('[1]\n', "line 1: a row must be a JSON object"),
    ("", "the file has no rows"),
    ("\n\n", "the file has no rows"),
])
def test_a_bad_dataset_file_names_the_file_the_row_and_the_column(tmp_path, content, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"^{path}: {problem}"):
        load_dataset(str(path), 0, 0)


def test_bad_parquet_and_chat_rows(tmp_path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet: the dataset has no rows"):
        load_dataset(str(tmp_path / "empty.parquet"), 0, 0)
    pq.write_table(pa.table({"prompt": [1, 2], "answer": ["1", "2"]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="ints.parquet: row 0: column 'prompt' must be a string, got int"):
        load_dataset(str(tmp_path / "ints.parquet"), 0, 0)
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet file"):
        load_dataset(str(tmp_path / "x.parquet"), 0, 0)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                "answer": 1}) + "\n")
    with pytest.raises(DataError, match="row 0: column 'messages' the last message is 'assistant'"):
        load_dataset(str(path), 0, 0, chat=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.jsonl"), 0, 0)


def test_rewards_follow_the_data_source_and_scale_to_the_default_weight(model_dir, data_files, monkeypatch):
    import rewards.scoring

    calls = []

    def fake(responses, rows, specs, **_):
        calls.append(([s.name for s in specs], {r["data_source"] for r in rows}))
        return [rewards.scoring.RewardResult(sum(s.weight for s in specs)) for _ in responses]  # all in full

    monkeypatch.setattr(rewards.scoring, "score_responses", fake)
    cfg = own_config(model_dir, data_files, "rewards=[{name: math_verify, weight: 2.0}]",
                     "rewards_by_source={word_sub: [{name: exact_match, weight: 0.5}]}")
    task = Run(cfg, data_files["dir"]).task
    rows = task.train_set.to_pylist()[:20]
    batch = make_rollout_batch([dict(prompt_index=i, sample_index=0, prompt_ids=[1], response_ids=[5],
                                     rollout_logprobs=[0], finish_reason="stop", policy_version=0)
                                for i in range(20)], rollout_schema(1, 2, 8))
    scores, _, _ = task.score(batch, rows)
    assert sorted(calls) == [(["exact_match"], {"word_sub"}), (["math_verify"], {"word_add"})], calls
    assert scores == [2.0] * 20  # a full score is `rewards`' total weight for every source


def test_prompts_over_the_budget_are_dropped_and_counted_or_stop_the_run(model_dir, data_files, capsys):
    lengths = sorted(len(p) for p in Run(own_config(model_dir, data_files), data_files["dir"]).task.train_prompts)
    budget = lengths[len(lengths) // 2]  # about half the prompts are longer
    expected = sum(n > budget for n in lengths)
    task = Run(own_config(model_dir, data_files, f"rollout.engine.max_model_len={budget + 16}"), data_files["dir"]).task
    assert 0 < expected < 150 and task.dropped["data/dropped_train_prompts"] == expected
    assert task.num_train == 150 - expected and max(len(p) for p in task.train_prompts) == budget
    assert f"dropped {expected} of 150 training prompts" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"train.jsonl: row \d+: the prompt is \d+ tokens; with rollout.max_tokens=16"):
        Run(own_config(model_dir, data_files, f"rollout.engine.max_model_len={budget + 16}", "data.overlong=error"),
            data_files["dir"])


# ---- bad input stops keel before Ray or an engine starts ------------------------------------------------


def _keel(args: list[str], capsys) -> str:
    import ray

    assert main(args) == 2
    assert not ray.is_initialized()
    return capsys.readouterr().err


def test_bad_data_stops_keel_train_and_eval_before_anything_starts(model_dir, data_files, tmp_path, capsys):
    config = str(Path(__file__).parent.parent / "configs" / "own_model.yaml")
    common = [f"model.checkpoint={model_dir}", f"data.eval_task={data_files['test']}",
              f"run.output_dir={tmp_path / 'runs'}"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "solution": "b", "answer": 1}) + "\n" + json.dumps({"prompt": "b"}))
    err = _keel(["train", config, *common, f"data.task={bad}"], capsys)
    assert f"{bad}: row 1: column 'answer' is missing" in err
    bad.write_text("")
    assert f"{bad}: the file has no rows" in _keel(["train", config, *common, f"data.task={bad}"], capsys)
    err = _keel(["eval", config, *common, f"data.task={data_files['train']}", f"data.eval_task={bad}",
                 "--checkpoint", str(model_dir)], capsys)
    assert f"{bad}: the file has no rows" in err


def test_a_tokenizer_larger_than_the_embedding_stops_keel(model_dir, data_files, tmp_path, bpe, capsys):
    small = tmp_path / "small"
    model = build_model(DeepseekV32Config(**{**model_fields(bpe), "vocab_size": 200}), seed=0)
    save_checkpoint(model, small, tokenizer=Tokenizer(bpe))
    with pytest.raises(CheckpointError, match=f"^{small / TOKENIZER_FILE}: the tokenizer has 300 token ids, more "
                                              "than the model's vocab_size 200"):
        check_checkpoint(small)
    err = _keel(["train", str(Path(__file__).parent.parent / "configs" / "own_model.yaml"),
                 f"model.checkpoint={small}", f"data.task={data_files['train']}",
                 f"data.eval_task={data_files['test']}",
                 f"run.output_dir={tmp_path / 'runs'}"], capsys)
    assert f"{small / TOKENIZER_FILE}: the tokenizer has 300 token ids" in err
    # A fresh preset model grows to the tokenizer unless the config pins a smaller vocab_size.
    tok_dir = tmp_path / "tok"
    bpe.save_pretrained(tok_dir)
    cfg = load_config(None, [f"model.tokenizer={tok_dir}", "data.format=chat", f"data.task={data_files['train']}",
                             f"data.eval_task={data_files['test']}", "rollout.max_tokens=8"])
    run = Run(cfg, tmp_path / "run")
    base = run.base_checkpoint()
    assert json.loads((base / "config.json").read_text())["vocab_size"] == 300
    assert load_tokenizer(base).same_as(run.tokenizer)
    with pytest.raises(CheckpointError, match="tok/tokenizer.json: the tokenizer has 300 token ids, more than "
                                              "model.overrides.vocab_size=64"):
        Run(load_config(None, [f"model.tokenizer={tok_dir}", "model.overrides.vocab_size=64"]), tmp_path / "r2")


def test_a_chat_template_that_fails_to_render_stops_keel(model_dir, data_files, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")
    with pytest.raises(FormatError, match=f"^{broken / 'chat_template.jinja'}: the chat template fails to render"):
        PromptFormat(load_tokenizer(broken), "chat")
    (broken / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompt, please') }}{% endif %}x")
    err = _keel(["train", str(Path(__file__).parent.parent / "configs" / "own_model.yaml"),
                 f"model.checkpoint={broken}", f"data.task={data_files['train']}",
                 f"data.eval_task={data_files['test']}", f"run.output_dir={tmp_path / 'runs'}"], capsys)
    assert str(broken / "chat_template.jinja") in err and "no system prompt, please" in err


def test_a_char_tokenizer_has_no_chat_format(tmp_path):
    with pytest.raises(FormatError, match="the DeepSeek-V3.2 encoding keel uses instead needs"):
        PromptFormat(CharTokenizer(), "chat")
    with pytest.raises(ConfigError, match="data.system_prompt needs data.format=chat"):
        load_config(None, ["data.system_prompt=hi"])
    with pytest.raises(ConfigError, match="data.format='jsonl': choose raw or chat"):
        load_config(None, ["data.format=jsonl"])


# ---- hub ids ----------------------------------------------------------------------------------------------


def test_a_hub_id_resolves_through_the_local_cache_and_offline_misses_say_so(tmp_path, monkeypatch, model_dir):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-dsa" / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir, snapshot)
    (cache / "models--someone--tiny-dsa" / "refs").mkdir()
    (cache / "models--someone--tiny-dsa" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("someone/tiny-dsa") == snapshot
    with pytest.raises(FileNotFoundError, match="'someone/absent' is not a local directory, and the Hugging Face "
                                                "hub id 'someone/absent' is not in the local cache .*HF_HUB_OFFLINE is "
                                                "set"):
        resolve_checkpoint("someone/absent")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "no" / "such" / "dir"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_pass_at_k():
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert torch.isclose(torch.tensor(pass_at_k(10, 3, 4)), torch.tensor(1 - 35 / 210))
