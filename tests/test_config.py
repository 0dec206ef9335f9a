"""The run configuration: schema, YAML, overrides and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl.cli import main
from rl.loop.config import ConfigError, load_config

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_quickstart_loads_with_overrides():
    cfg = load_config(QUICKSTART, ["grpo.kl_coef=0.05", "grpo.offpolicy_delta=null", "run.steps=3"])
    assert cfg.grpo.kl_coef == 0.05 and cfg.grpo.offpolicy_delta is None and cfg.run.steps == 3
    assert cfg.rollout.top_k == 8  # from the YAML, over the schema default 0
    assert cfg.rollout.engine.dtype == "float32"  # schema default where the YAML is silent
    # the paper's objective by default: the mask leaves the KL term alone; pi_old is the engine's
    assert cfg.grpo.mask_kl is False and cfg.grpo.old_logprobs == "engine"
    assert load_config(QUICKSTART, ["grpo.old_logprobs=trainer"]).grpo.old_logprobs == "trainer"


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("grpo:\n  kl_coeff: 0.1\n", r"grpo\.kl_coeff.*Did you mean: 'kl_coef'"),
        ("grpo:\n  kl_coef: lots\n", r"grpo\.kl_coef.*could not be converted"),
        ("rollout:\n  group_size: 1\n", r"group_size must be >= 2"),
        ("grpo:\n  kl_estimator: k2\n", r"kl_estimator='k2'"),
        ("grpo:\n  old_logprobs: sampler\n", r"grpo\.old_logprobs='sampler': choose engine .* or trainer"),
        ("grpo:\n  mask_kl: maybe\n", r"grpo\.mask_kl"),
        ("grpo:\n  indexer_grad_clip: -1\n", r"grpo\.indexer_grad_clip=-1"),
        ("trainer:\n  zero_stage: 4\n", r"trainer\.zero_stage=4 must be 0, 1, 2 or 3"),
        ("run: [1, 2\n", r"not valid YAML"),
    ],
)
def test_bad_configs_name_the_key_and_file(tmp_path, yaml_text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"rollout\.nope"):
        load_config(None, ["rollout.nope=1"])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo:\n  kl_coeff: 0.1\n")
    assert main(["show-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "kl_coeff" in err and "Traceback" not in err


def test_cli_show_config_and_unbuilt_commands(capsys):
    assert main(["show-config", str(QUICKSTART), "run.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main(["distill", "--resume", "/nonexistent/run"]) == 2
    assert "/nonexistent/run" in capsys.readouterr().err
