"""`keel specialists run.parallel=true`: each specialist as its own Ray job on a (local, real) Ray cluster.

The cluster is a `ray start --head` in its own temp dir and ports: a plain `ray.init()` elsewhere on the machine
reads the address file of the default temp dir, so other runs and tests keep starting their own local Ray.
Training is cut to a few steps: this checks the job machinery (submission, concurrency, the resume that waits for
or skips jobs), not what the specialists learn (tests/test_recipes.py does that sequentially).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent.parent / "configs"
BIN = Path(sys.executable).parent
OVERRIDES = [
    "train.run.wandb_mode=disabled",
    "train.run.dump_rollouts=false",
    "train.run.steps=2",
    "train.run.checkpoint_every=2",
    "train.data.eval_size=16",
    "train.rollout.prompts_per_step=8",
    "train.grpo.mini_batch_size=64",
    "base.rows_per_domain=200",
    "base.train.sft.steps=20",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster with the job server; yields (gcs address, dashboard url, env for its clients)."""
    temp = tempfile.mkdtemp(prefix="keel-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # Every fixed default port too: other local Rays on this machine (ray.init() in tests and runs) hold them.
    port, dashboard, *others = (_free_port() for _ in range(8))
    fixed = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port"]
    # Jobs run `keel` from the PATH of the cluster's processes: this venv's bin first.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # `ray start` turns token authentication on when ~/.ray/auth_token exists (a local ray.init() writes one), and a
    # client given an explicit address turns it on only when told to.
    env["RAY_AUTH_MODE"] = "token"
    ray = str(BIN / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], check=True, env=env, capture_output=True, timeout=60)
    subprocess.run([ray, "start", "--head", f"--temp-dir={temp}", f"--port={port}", "--num-cpus=4",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--disable-usage-stats", *(f"{flag}={p}" for flag, p in zip(fixed, others, strict=True))],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: str) -> None:
    """Stop the processes of the cluster in `temp` only: `ray stop` would stop every Ray on the machine."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp in arg for arg in p.info["cmdline"] or []):
            procs.append(p)
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        p.kill()


def _specialists(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "keel"), "specialists", *args], env=env, capture_output=True, text=True,
                          timeout=2400)


def _jobs(dashboard: str, jobs: dict[str, str], env: dict) -> dict[str, dict]:
    """Status and start/end times of the named jobs, asked from a process with the cluster's auth settings."""
    script = ("import json, sys\nfrom ray.job_submission import JobSubmissionClient\n"
              "c = JobSubmissionClient(sys.argv[1])\n"
              "infos = {n: c.get_job_info(j) for n, j in json.loads(sys.argv[2]).items()}\n"
              "print(json.dumps({n: {'status': str(i.status.value), 'start': i.start_time, 'end': i.end_time}"
              " for n, i in infos.items()}))")
    out = subprocess.run([sys.executable, "-c", script, dashboard, json.dumps(jobs)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_specialists_as_ray_jobs(ray_cluster, tmp_path):
    address, dashboard, env = ray_cluster
    out = _specialists([str(CONFIGS / "specialists.yaml"), *OVERRIDES, f"run.output_dir={tmp_path}",
                        "run.parallel=true", f"run.job_address={dashboard}", "--ray-address", address], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recipe_dir = next(tmp_path.glob("specialists-*"))
    state = json.loads((recipe_dir / "state.json").read_text())
    jobs = {n: s["job_id"] for n, s in state["specialists"].items()}
    assert set(jobs) == {"math", "sort"} and all(j.startswith(f"keel-{n}-") for n, j in jobs.items())

    info = _jobs(dashboard, jobs, env)
    assert {n: i["status"] for n, i in info.items()} == {n: "SUCCEEDED" for n in jobs}
    # Both jobs were admitted at once (4 CPUs, 2 per specialist): each started before the other ended.
    assert info["math"]["start"] < info["sort"]["end"] and info["sort"]["start"] < info["math"]["end"]

    summary = json.loads((recipe_dir / "summary.json").read_text())
    assert set(summary["table"]) == {"base", "math", "sort"}
    for name, run_dir in summary["runs"].items():
        assert run_dir == state["specialists"][name]["run_dir"]
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in records) == 2  # trained its steps inside its job
        assert (Path(run_dir) / "summary.json").exists()

    # Resumed after the jobs finished: nothing is resubmitted, the table is rebuilt from the same models.
    (recipe_dir / "summary.json").unlink()
    again = _specialists(["--resume", str(recipe_dir), "--ray-address", address], env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = json.loads((recipe_dir / "state.json").read_text())
    assert {n: s["job_id"] for n, s in resumed["specialists"].items()} == jobs
    assert "submitted Ray job" not in again.stdout + again.stderr
    assert json.loads((recipe_dir / "summary.json").read_text())["table"] == summary["table"]
