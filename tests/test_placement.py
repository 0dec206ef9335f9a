"""The placement check (rl.loop.placement): a plan the cluster cannot hold, or a batch that does not split over
the trainer ranks, is refused before any actor starts, naming what is missing."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rl.loop.config import ConfigError
from rl.loop.placement import check_placement, placement_problems

GPU_NODE = {"CPU": 16.0, "GPU": 8.0}


def test_a_plan_that_fits_has_no_problems():
    # 8 trainer GPUs on one node, two TP-4 engines on the other.
    assert placement_problems([GPU_NODE, GPU_NODE], 8, 1.0, 1.0, 2, 4, 512) == []
    # CPU: engines reserve no Ray slot; the ranks need one CPU each.
    assert placement_problems([{"CPU": 2.0}], 2, 1.0, 0.0, 4, 0, 8) == []


def test_too_few_gpus_names_the_first_unplaceable_actor_and_the_totals():
    (problem,) = placement_problems([GPU_NODE], 8, 1.0, 1.0, 2, 4, 512)
    assert problem.startswith("trainer rank 0 needs 1 CPU, 1 GPU on one node")  # the engines, larger, went first
    assert "8 CPU, 16 GPU in all" in problem and "have 16 CPU, 8 GPU" in problem


def test_an_engine_split_over_two_nodes_does_not_fit():
    # 8 GPUs in all, but a TP-8 engine needs them on one node.
    (problem,) = placement_problems([{"CPU": 8.0, "GPU": 4.0}] * 2, 1, 1.0, 0.0, 1, 8, 8)
    assert "rollout engine 0 needs 0 CPU, 8 GPU on one node" in problem


def test_cpu_ranks_beyond_the_cluster():
    (problem,) = placement_problems([{"CPU": 2.0}], 3, 1.0, 0.0, 1, 0, 6)
    assert problem.startswith("trainer rank 2 needs 1 CPU, 0 GPU")


def test_batch_not_divisible_by_the_ranks_and_the_config_error_names_both():
    cfg = OmegaConf.create({"trainer": {"num_ranks": 3, "cpus_per_rank": 1.0, "gpus_per_rank": 0.0},
                            "rollout": {"num_workers": 1, "prompts_per_step": 2, "group_size": 4,
                                        "engine": {"tensor_parallel_size": 1}}})
    with pytest.raises(ConfigError) as info:
        check_placement(cfg, [{"CPU": 2.0}])
    message = str(info.value)
    assert "batch of 8 rows" in message and "trainer.num_ranks=3" in message
    assert "trainer rank 2 needs 1 CPU" in message
