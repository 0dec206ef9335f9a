"""The placement plan and its check (rl.loop.placement): bundles planned from the config; a plan the cluster cannot
hold, or a batch that does not split over the trainer ranks, is refused before any actor starts, naming what is
missing."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rl.loop.config import ConfigError, PlacementConfig
from rl.loop.placement import LABEL_UNITS, check_placement, placement_problems, plan_placement

GPU_NODE = {"CPU": 16.0, "GPU": 8.0}


def config(num_ranks: int = 1, cpus: float = 1.0, gpus: float = 0.0, workers: int = 1, tp: int = 1,
           prompts: int = 2, group: int = 4, **placement) -> OmegaConf:
    return OmegaConf.create({"trainer": {"num_ranks": num_ranks, "cpus_per_rank": cpus, "gpus_per_rank": gpus},
                             "rollout": {"num_workers": workers, "prompts_per_step": prompts, "group_size": group,
                                         "engine": {"tensor_parallel_size": tp}},
                             "placement": placement})


def plan(num_ranks: int, cpus: float, gpus: float, workers: int, tp: int, **placement):
    cfg = config(num_ranks, cpus, gpus, workers, tp)
    return plan_placement(cfg.trainer, cfg.rollout, PlacementConfig(**placement), cuda=bool(gpus))


def test_the_plan_has_one_bundle_per_rank_and_engine_with_the_labels():
    p = plan(2, 1.0, 0.0, 3, 1, trainer_resource="keel_trainer", rollout_resource="keel_rollout")
    assert p.trainer == [{"CPU": 1.0, "keel_trainer": LABEL_UNITS}] * 2
    assert p.rollout == [{"keel_rollout": LABEL_UNITS}] * 3  # a CPU engine reserves only the label
    assert plan(1, 1.0, 0.0, 2, 1).rollout == [{}, {}]  # nothing to reserve: no placement group for the engines
    assert plan(8, 1.0, 1.0, 2, 4).rollout == [{"GPU": 4.0}] * 2


def test_a_plan_that_fits_has_no_problems():
    # 8 trainer GPUs on one node, two TP-4 engines on the other.
    assert placement_problems([GPU_NODE, GPU_NODE], plan(8, 1.0, 1.0, 2, 4), 512) == []
    # CPU: engines reserve no Ray slot; the ranks need one CPU each.
    assert placement_problems([{"CPU": 2.0}], plan(2, 1.0, 0.0, 4, 1), 8) == []
    labelled = plan(1, 1.0, 0.0, 1, 1, trainer_resource="keel_trainer", rollout_resource="keel_rollout")
    assert placement_problems([{"CPU": 2.0, "keel_trainer": 1.0}, {"CPU": 1.0, "keel_rollout": 1.0}], labelled, 8) == []


def test_too_few_gpus_names_the_first_unplaceable_actor_and_the_totals():
    (problem,) = placement_problems([GPU_NODE], plan(8, 1.0, 1.0, 2, 4), 512)
    assert problem.startswith("trainer rank 0 needs 1 CPU, 1 GPU on one node")  # the engines, larger, went first
    assert "8 CPU, 16 GPU in all" in problem and "have 16 CPU, 8 GPU" in problem


def test_an_engine_split_over_two_nodes_does_not_fit():
    # 8 GPUs in all, but a TP-8 engine needs them on one node.
    (problem,) = placement_problems([{"CPU": 8.0, "GPU": 4.0}] * 2, plan(1, 1.0, 1.0, 1, 8), 8)
    assert "rollout engine 0 needs 0 CPU, 8 GPU on one node" in problem


def test_cpu_ranks_beyond_the_cluster():
    (problem,) = placement_problems([{"CPU": 2.0}], plan(3, 1.0, 0.0, 1, 1), 6)
    assert problem.startswith("trainer rank 2 needs 1 CPU, 0 GPU")


def test_a_missing_node_label_names_the_resource_and_how_to_declare_it():
    p = plan(1, 1.0, 0.0, 1, 1, trainer_resource="keel_trainer", rollout_resource="keel_rollout")
    (problem,) = placement_problems([{"CPU": 2.0, "keel_trainer": 1.0}], p, 8)  # the rollout node is gone
    assert problem.startswith("placement.rollout_resource='keel_rollout': no alive Ray node has the custom resource")
    assert """ray start --resources='{"keel_rollout": 1}'""" in problem and "1 keel_trainer" in problem


def test_labelled_nodes_too_small_for_the_ranks():
    p = plan(2, 2.0, 0.0, 1, 1, trainer_resource="keel_trainer")
    nodes = [{"CPU": 2.0, "keel_trainer": 1.0}, {"CPU": 8.0}]  # the big node is not a trainer node
    (problem,) = placement_problems(nodes, p, 8)
    assert problem.startswith("trainer rank 1 needs 2 CPU, 0 GPU, 0.001 keel_trainer on one node")


def test_colocated_and_strict_pack_need_one_node_for_the_whole_group():
    p = plan(2, 1.0, 1.0, 1, 2, colocate=True)  # 2 rank GPUs + a TP-2 engine: 4 GPUs on one node
    (problem,) = placement_problems([{"CPU": 8.0, "GPU": 2.0}] * 2, p, 8)
    assert problem.startswith("the colocated group (2 trainer ranks, 1 engines, placement.colocate) needs 2 CPU, "
                              "4 GPU on one node")
    assert placement_problems([{"CPU": 8.0, "GPU": 4.0}], p, 8) == []
    strict = plan(2, 2.0, 0.0, 1, 1, trainer_strategy="STRICT_PACK")
    (problem,) = placement_problems([{"CPU": 2.0}] * 2, strict, 8)
    assert problem.startswith("the 2 trainer ranks (STRICT_PACK) needs 4 CPU")


def test_bad_placement_fields_are_named():
    with pytest.raises(ConfigError, match=r"placement.rollout_strategy='ANYWHERE': choose one of PACK, SPREAD"):
        plan(1, 1.0, 0.0, 1, 1, rollout_strategy="ANYWHERE")
    with pytest.raises(ConfigError, match="placement.colocate puts every actor on one node"):
        plan(1, 1.0, 0.0, 1, 1, colocate=True, trainer_resource="a", rollout_resource="b")


def test_batch_not_divisible_by_the_ranks_and_the_config_error_names_both():
    with pytest.raises(ConfigError) as info:
        check_placement(config(num_ranks=3), [{"CPU": 2.0}])
    message = str(info.value)
    assert "batch of 8 rows" in message and "trainer.num_ranks=3" in message
    assert "trainer rank 2 needs 1 CPU" in message


def test_a_lost_rollout_node_stops_the_run_only_when_no_alive_node_can_hold_the_worker():
    from rollout.client import lost_node

    need = {"keel_rollout": LABEL_UNITS}
    trainer = {"NodeID": "t", "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": {"keel_trainer": 1.0}}
    dead = {"NodeID": "r1", "NodeManagerAddress": "10.0.0.2", "Alive": False, "Resources": {"keel_rollout": 1.0}}
    spare = {"NodeID": "r2", "NodeManagerAddress": "10.0.0.3", "Alive": True, "Resources": {"keel_rollout": 1.0}}
    problem = lost_node([trainer, dead], "r1", need)
    assert problem.startswith("Ray node r1 (10.0.0.2) was lost, and no alive node has what the worker needs "
                              "({'keel_rollout': 0.001})")
    assert lost_node([trainer, dead, spare], "r1", need) is None  # Ray restarts the worker on the spare node
    assert lost_node([trainer, dead], "r1", {}) is None  # unplaced: any alive node can take it
    assert lost_node([trainer, {**dead, "Alive": True}], "r1", need) is None  # not lost (yet)
