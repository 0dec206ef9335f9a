"""Where a run's actors go on the Ray cluster, planned from the config, checked, then reserved, before any starts.

A run places `trainer.num_ranks` trainer ranks (one placement-group bundle each: cpus_per_rank CPUs and
gpus_per_rank GPUs) and `rollout.num_workers` engines (on GPUs: tensor_parallel_size GPUs each, on one node;
on CPU an engine reserves no Ray slot: vLLM sizes its own threads). The `placement` section says where:

- `trainer_resource` / `rollout_resource`: a custom Ray resource that marks the nodes a group may use
  (`ray start --resources='{"keel_trainer": 1}'` on trainer nodes, `{"keel_rollout": 1}` on rollout nodes).
  Each bundle asks LABEL_UNITS of it, so a node that declares 1 holds up to 1000 of keel's actors: the
  resource is a label, not a count.
- `colocate`: every rank and engine in one STRICT_PACK placement group, so all on one node (an engine that
  reserves nothing shares rank 0's bundle).
- `trainer_strategy` / `rollout_strategy`: Ray's strategy for each group (PACK, SPREAD, STRICT_PACK).

Without any of these the engines on CPU get no placement group (nothing to reserve) and the ranks one PACK
group, as before. Ray would wait forever for a bundle no node can hold, so `placement_problems` (pure: first-fit
of the largest bundles onto the alive nodes' resources) stops the run first, naming what is missing, and
`reserve` gives up after a bounded wait when the resources exist but are held by others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rl.loop.config import ConfigError

LABEL_UNITS = 0.001  # of a custom resource, per bundle
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK")


@dataclass(frozen=True)
class PlacementPlan:
    """The bundles of a run: one per trainer rank, one per rollout engine ({}: the engine reserves nothing)."""

    trainer: list[dict[str, float]]
    rollout: list[dict[str, float]]
    trainer_strategy: str = "PACK"
    rollout_strategy: str = "PACK"
    colocate: bool = False
    labels: dict[str, str] = field(default_factory=dict)  # custom resource -> the group it marks ("trainer")


def plan_placement(trainer: Any, rollout: Any, placement: Any, cuda: bool) -> PlacementPlan:
    """The bundles and strategies the config asks for (`trainer`, `rollout`, `placement` sections; `cuda`: the
    engines run on GPUs). Raises ConfigError naming a bad field."""
    problems = [f"placement.{k}={getattr(placement, k)!r}: choose one of {', '.join(STRATEGIES)}"
                for k in ("trainer_strategy", "rollout_strategy") if getattr(placement, k) not in STRATEGIES]
    if trainer.num_ranks < 1:
        problems.append(f"trainer.num_ranks={trainer.num_ranks} must be >= 1")
    if placement.colocate and (placement.trainer_resource != placement.rollout_resource):
        problems.append("placement.colocate puts every actor on one node: placement.trainer_resource "
                        f"({placement.trainer_resource!r}) and placement.rollout_resource "
                        f"({placement.rollout_resource!r}) must then be the same")
    if problems:
        raise ConfigError("; ".join(problems))
    rank = {"CPU": float(trainer.cpus_per_rank), "GPU": float(trainer.gpus_per_rank)}
    engine = {"GPU": float(rollout.engine.tensor_parallel_size)} if cuda else {}
    labels = {}
    for bundle, name, what in ((rank, placement.trainer_resource, "trainer"),
                               (engine, placement.rollout_resource, "rollout")):
        if name:
            bundle[name] = LABEL_UNITS
            labels[name] = f"{labels[name]} and {what}" if name in labels else what
    positive = {k: v for k, v in rank.items() if v > 0}
    return PlacementPlan([positive] * trainer.num_ranks, [{k: v for k, v in engine.items() if v > 0}] *
                         rollout.num_workers, placement.trainer_strategy, placement.rollout_strategy,
                         bool(placement.colocate), labels)


def placement_problems(nodes: list[dict[str, float]], plan: PlacementPlan, batch_rows: int) -> list[str]:
    """What the plan lacks on `nodes` (each alive node's total resources, e.g. {"CPU": 16, "GPU": 8,
    "keel_trainer": 1}); [] if it fits. batch_rows: rows of one step's batch, split evenly over the ranks.

    Bundles go largest first, each onto the first node with enough left (STRICT_PACK and colocate: the group's
    bundles summed, onto one node)."""
    problems = []
    n = len(plan.trainer)
    if batch_rows % n:
        problems.append(f"a step's batch of {batch_rows} rows (prompts_per_step * group_size) does not split over "
                        f"trainer.num_ranks={n}: choose a divisor of {batch_rows}")
    for name, what in plan.labels.items():
        if not any(node.get(name, 0.0) > 0 for node in nodes):  # then no bundle of that group fits: one line
            problems.append(f"placement.{what.split()[0]}_resource={name!r}: no alive Ray node has the custom "
                            f"resource {name!r}; start the {what} nodes with `ray start --resources="
                            f"'{{\"{name}\": 1}}'` (the cluster's nodes: {[_fmt(x) for x in nodes]})")
    if any(p.startswith("placement.") for p in problems):
        return problems
    asks = [(f"trainer rank {i}", b) for i, b in enumerate(plan.trainer)]
    asks += [(f"rollout engine {i}", b) for i, b in enumerate(plan.rollout) if b]
    if plan.colocate:
        asks = [(f"the colocated group ({n} trainer ranks, {len(plan.rollout)} engines, placement.colocate)",
                 _sum([b for _, b in asks]))]
    elif plan.trainer_strategy == "STRICT_PACK":
        asks = [(f"the {n} trainer ranks (STRICT_PACK)", _sum(plan.trainer))] + asks[n:]
    free = [dict(node) for node in nodes]
    for what, need in sorted(asks, key=lambda a: (-a[1].get("GPU", 0.0), -a[1].get("CPU", 0.0))):
        node = next((f for f in free if all(f.get(k, 0.0) >= v - 1e-9 for k, v in need.items())), None)
        if node is None:
            total, have = _sum([b for _, b in asks]), _sum(nodes)
            problems.append(f"{what} needs {_fmt(need)} on one node, and no node has that left; the plan needs "
                            f"{_fmt(total)} in all ({n} trainer ranks, {len(plan.rollout)} engines), the "
                            f"cluster's {len(nodes)} node(s) have {_fmt(have)} (per node: "
                            f"{[_fmt(x) for x in nodes]}): add nodes or lower trainer.num_ranks / "
                            "rollout.num_workers / their resources")
            break
        for k, v in need.items():
            node[k] -= v
    return problems


def _sum(bundles: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fmt(resources: dict[str, float]) -> str:
    """CPU and GPU always, then any custom resource keel asks for (Ray's own node:/memory keys left out)."""
    extra = sorted(k for k in resources if k.startswith("keel") or (k not in ("CPU", "GPU") and not k.startswith(
        ("node:", "memory", "object_store_memory", "accelerator_type"))))
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in ("CPU", "GPU", *extra))


def cluster_nodes() -> list[dict[str, float]]:
    """The alive Ray nodes' total resources (needs a connected Ray)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def run_plan(cfg: Any) -> PlacementPlan:
    """The plan of a `keel train` config (a run with GPU trainer ranks runs its engines on GPUs too)."""
    from rl.loop.config import PlacementConfig, as_dataclass

    placement = as_dataclass(PlacementConfig, cfg.get("placement", {}))
    return plan_placement(cfg.trainer, cfg.rollout, placement, cuda=bool(cfg.trainer.gpus_per_rank))


def check_placement(cfg: Any, nodes: list[dict[str, float]]) -> PlacementPlan:
    """The run's plan; ConfigError naming what is missing when `nodes` cannot hold it."""
    plan = run_plan(cfg)
    problems = placement_problems(nodes, plan, cfg.rollout.prompts_per_step * cfg.rollout.group_size)
    if problems:
        raise ConfigError("the run's placement does not fit the Ray cluster:\n  " + "\n  ".join(problems))
    return plan


@dataclass
class Reserved:
    """The placement groups made for a plan: (group, bundle index per actor) for the trainer ranks and for the
    engines (None: the engines go where Ray puts them)."""

    trainer: tuple[Any, list[int]]
    rollout: tuple[Any, list[int]] | None
    groups: list[Any]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups:
            remove_placement_group(pg)
        self.groups = []


def reserve(plan: PlacementPlan, timeout_s: float = 120.0) -> Reserved:
    """Ray placement groups for `plan`, ready; ConfigError when one is not placed within `timeout_s` (the
    resources exist, `placement_problems` said so, but other jobs hold them)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    n, engines = len(plan.trainer), [b for b in plan.rollout if b]
    if plan.colocate:
        pg = placement_group(plan.trainer + engines, strategy="STRICT_PACK")
        rollout = list(range(n, n + len(engines))) if engines else [0] * len(plan.rollout)
        made = [("the colocated group", pg)]
        reserved = Reserved((pg, list(range(n))), (pg, rollout), [pg])
    else:
        trainer_pg = placement_group(plan.trainer, strategy=plan.trainer_strategy)
        made = [("the trainer ranks' group", trainer_pg)]
        rollout_pg = None
        if engines:
            rollout_pg = placement_group(engines, strategy=plan.rollout_strategy)
            made.append(("the rollout engines' group", rollout_pg))
        reserved = Reserved((trainer_pg, list(range(n))),
                            (rollout_pg, list(range(len(engines)))) if rollout_pg else None, [pg for _, pg in made])
    for what, pg in made:
        if not pg.wait(timeout_s):
            for _, other in made:
                remove_placement_group(other)
            raise ConfigError(f"{what} ({pg.bundle_specs}) was not placed within {timeout_s:.0f} s: the cluster "
                              f"has the resources ({[_fmt(x) for x in cluster_nodes()]}) but others hold them")
    return reserved


def where(publisher_node: str | None, worker_nodes: list[str | None]) -> str:
    """One line naming the nodes (by IP) of trainer rank 0 and of each rollout worker (needs a connected Ray)."""
    import ray

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}

    def name(node: str | None) -> str:
        return f"{ips.get(node, '?')} ({(node or '?')[:8]})"

    return f"trainer rank 0 on {name(publisher_node)}, rollout workers on {[name(n) for n in worker_nodes]}"
