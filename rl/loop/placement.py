"""Whether the Ray cluster can hold a run's actors, checked before any of them starts.

A run places `trainer.num_ranks` trainer ranks (one placement-group bundle each: cpus_per_rank CPUs and
gpus_per_rank GPUs, on one node) and `rollout.num_workers` engines (on GPUs: tensor_parallel_size GPUs each,
on one node; on CPU an engine reserves no Ray slot). Ray would otherwise wait for resources that never come,
or start the trainer and hang on the engines. `placement_problems` is the pure check: first-fit of the
largest bundles onto the nodes' resources, and the batch split over the ranks.
"""

from __future__ import annotations

from typing import Any

from rl.loop.config import ConfigError


def placement_problems(
    nodes: list[dict[str, float]], num_ranks: int, cpus_per_rank: float, gpus_per_rank: float,
    num_workers: int, engine_gpus: int, batch_rows: int,
) -> list[str]:
    """What the plan lacks on `nodes` (each node's total resources, e.g. {"CPU": 16, "GPU": 8}); [] if it fits.

    engine_gpus: GPUs per rollout engine (0 on CPU). batch_rows: rows of one step's batch, split evenly over
    the trainer ranks."""
    problems = []
    if num_ranks < 1:
        return [f"trainer.num_ranks={num_ranks} must be >= 1"]
    if batch_rows % num_ranks:
        problems.append(f"a step's batch of {batch_rows} rows (prompts_per_step * group_size) does not split over "
                        f"trainer.num_ranks={num_ranks}: choose a divisor of {batch_rows}")
    free = [{"CPU": n.get("CPU", 0.0), "GPU": n.get("GPU", 0.0)} for n in nodes]
    asks = [(f"trainer rank {i}", {"CPU": cpus_per_rank, "GPU": gpus_per_rank}) for i in range(num_ranks)]
    asks += [(f"rollout engine {i}", {"CPU": 0.0, "GPU": float(engine_gpus)}) for i in range(num_workers)]
    for what, need in sorted(asks, key=lambda a: (-a[1]["GPU"], -a[1]["CPU"])):
        node = next((f for f in free if all(f[k] >= v for k, v in need.items())), None)
        if node is None:
            total = {k: sum(a[1][k] for a in asks) for k in ("CPU", "GPU")}
            have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
            problems.append(f"{what} needs {_fmt(need)} on one node, and no node has that left; the plan needs "
                            f"{_fmt(total)} in all ({num_ranks} trainer ranks, {num_workers} engines), the "
                            f"cluster's {len(nodes)} node(s) have {_fmt(have)} (per node: "
                            f"{[_fmt(n) for n in nodes]}): add nodes or lower trainer.num_ranks / "
                            "rollout.num_workers / their resources")
            break
        for k, v in need.items():
            node[k] -= v
    return problems


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))


def cluster_nodes() -> list[dict[str, float]]:
    """The alive Ray nodes' total CPU and GPU (needs a connected Ray)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_placement(cfg: Any, nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError naming what is missing when `nodes` cannot hold the run `cfg` plans (a run with GPU
    trainer ranks runs its engines on GPUs too)."""
    t, r = cfg.trainer, cfg.rollout
    cuda = bool(t.gpus_per_rank)
    problems = placement_problems(nodes, t.num_ranks, t.cpus_per_rank, t.gpus_per_rank, r.num_workers,
                                  r.engine.tensor_parallel_size if cuda else 0, r.prompts_per_step * r.group_size)
    if problems:
        raise ConfigError("the run's placement does not fit the Ray cluster:\n  " + "\n  ".join(problems))
