"""Held-out evaluation: generated sets are drawn disjoint, and any shared prompt stops the run."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from rl.loop.data import load_dataset
from rl.loop.held_out import HeldOutError, check_held_out, held_out_split

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def generated_split(task="addition", max_operand=19, train_size=4000, eval_size=200, seed=0, eval_seed=12345):
    return held_out_split(task, "", train_size, eval_size, seed, eval_seed,
                          lambda t, n, s: load_dataset(t, n, s, max_operand), lambda t: "." not in t)


def test_generated_sets_are_disjoint_full_size_and_the_eval_prompts_distinct():
    train, evals = generated_split()
    assert train.num_rows == 4000 and evals.num_rows == 200
    eval_prompts = evals.column("prompt").to_pylist()
    assert len(set(eval_prompts)) == 200
    assert not set(eval_prompts) & set(train.column("prompt").to_pylist())
    assert len(set(train.column("prompt").to_pylist())) == 400 - 200  # every other a+b=, a, b <= 19
    check_held_out(train, evals)
    again = generated_split()
    assert again[0].equals(train) and again[1].equals(evals)  # a function of the seeds


def test_a_shared_prompt_raises_naming_it(tmp_path):
    train = pa.table({"prompt": ["1+1=", "2+2=", "3+3="], "answer": ["2", "4", "6"]})
    evals = pa.table({"prompt": ["2+2=", "5+5="], "answer": ["4", "10"]})
    with pytest.raises(HeldOutError, match=r"1 of the 2 evaluation prompts .*'2\+2='"):
        check_held_out(train, evals)
    # files are taken as they are, and checked
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train.to_pylist()))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in evals.to_pylist()))
    tr, ev = held_out_split(str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl"), 0, 0, 0, 0,
                            lambda t, n, s: load_dataset(t, n, s), lambda t: "." not in t)
    assert tr.num_rows == 3 and ev.num_rows == 2
    with pytest.raises(HeldOutError):
        check_held_out(tr, ev)


def test_chat_rows_compare_by_their_messages():
    chat = [{"role": "user", "content": "hi"}]
    train = pa.Table.from_pylist([{"messages": chat, "answer": "1"}])
    with pytest.raises(HeldOutError):
        check_held_out(train, pa.Table.from_pylist([{"messages": chat, "answer": "2"}]))
    check_held_out(train, pa.Table.from_pylist([{"messages": [{"role": "user", "content": "ho"}], "answer": "2"}]))


def test_a_task_too_small_to_split_says_so():
    with pytest.raises(HeldOutError, match="too few distinct prompts"):
        generated_split(max_operand=9, eval_size=150)  # 100 distinct prompts


def test_the_sloppy_teacher_is_off_by_one_on_its_share_of_rows():
    from rl.loop.data import DataError, off_by_one_responses

    table = load_dataset("addition", 4000, 0, 19)
    taught = off_by_one_responses(table, 0.6, seed=0)
    answers, responses = taught.column("answer").to_pylist(), taught.column("response").to_pylist()
    off = [int(r) == int(a) + 1 for a, r in zip(answers, responses, strict=True)]
    assert all(o or r == a for o, a, r in zip(off, answers, responses, strict=True))
    assert abs(sum(off) / len(off) - 0.6) < 0.03
    assert off_by_one_responses(table, 0.6, seed=0).equals(taught)
    assert answers == table.column("answer").to_pylist()  # the rewards still check the true sum
    with pytest.raises(DataError, match="integer answers"):
        off_by_one_responses(pa.table({"prompt": ["x"], "answer": ["1/2"]}), 0.5, seed=0)


def test_the_quickstart_task_trains_on_the_teacher_and_refuses_a_shared_prompt(tmp_path):
    from rl.loop.config import ConfigError, load_config
    from rl.loop.tasks import PromptTask
    from rl.model.tokenizer import CharTokenizer

    cfg = load_config(QUICKSTART)
    task = PromptTask(cfg, CharTokenizer())
    task.check_held_out()
    assert task.eval_set.num_rows == 100 and task.train_set.num_rows == 4000
    row = task.train_set.slice(0, 1).to_pylist()[0]
    ids, targets, mask = task.sft_tensors([0])
    tok = CharTokenizer()
    taught = [t for t, m in zip(targets[0].tolist(), mask[0].tolist(), strict=True) if m]
    assert taught == tok.encode(row["response"], bos=False) + [tok.eos_id]

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[6:]))
    overlapping = load_config(QUICKSTART, [f"data.task={tmp_path / 'train.jsonl'}",
                                                          f"data.eval_task={tmp_path / 'eval.jsonl'}",
                                                          "data.sft_off_by_one=0"])
    task = PromptTask(overlapping, CharTokenizer())
    with pytest.raises(HeldOutError, match="2 of the 2 evaluation prompts"):
        task.check_held_out()
    with pytest.raises(HeldOutError):
        task.evaluate(client=None, sampling={})  # before the engine is asked for anything
    with pytest.raises(ConfigError, match="sft_off_by_one"):
        load_config(QUICKSTART, ["data.sft_off_by_one=1.5"])
