"""A real multi-node Ray cluster on this machine: trainer on one node, the rollout worker on another, rollout
nodes lost mid-run.

Each node is its own `ray start` (its own raylet, object store and temp dir) in its own network namespace. The
trainer node's namespace holds a bridge; each rollout node's namespace is joined to it by a veth pair, so the
nodes reach each other only over those links and the weights cross them through Ray's object store. The head
("trainer" node) declares the custom resource keel_trainer, the two others ("rollout", "spare") keel_rollout; the
run places its actors by them (`placement.*`). `keel train` runs inside the head's namespace (a Ray driver needs
a raylet at its own address).

The test: GRPO steps with cross-node weight sync. Once two checkpoints exist, the rollout worker is caught in
generate and every process of its node is killed (the node is lost, its raylet included): Ray re-places the
worker's bundle on the other keel_rollout node, the client brings the restarted worker to the current weights and
re-issues its share, and the run goes on. Then that node is lost too: with no keel_rollout node left the run
stops, naming it; a resume while it is gone stops before any actor starts, naming the missing resource; with a
node back, `--resume` finishes the run with every step recorded exactly once. Needs root and `ip` (iproute2);
skipped otherwise. Teardown kills every process in the namespaces by pid and deletes them, whatever happened.
No fallback to ray.cluster_utils.Cluster is written: namespaces work where keel's CI runs (root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from rl.loop.metrics import read_metrics

ROOT = Path(__file__).parent.parent
KEEL = Path(sys.executable).parent / "keel"
RAY = Path(sys.executable).parent / "ray"
STEPS, KILL_AFTER = 7, 2  # the worker's first node is killed once step KILL_AFTER's checkpoint exists
PORT = 6379  # inside the head's namespace: no clash with any other Ray on the machine
OVERRIDES = [
    f"run.steps={STEPS}", "run.checkpoint_every=1", "run.keep_checkpoints=10", "run.wandb_mode=disabled",
    "data.train_size=64", "data.eval_size=2", "sft.steps=0", "rollout.prompts_per_step=4", "rollout.group_size=4",
    "rollout.max_tokens=4", "grpo.mini_batch_size=8", "trainer.num_ranks=1",
    "placement.trainer_resource=keel_trainer", "placement.rollout_resource=keel_rollout",
]
# The GCS declares a node dead after this many missed health checks of this period (defaults: 5 x 3 s).
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


class Nodes:
    """Network namespaces, a Ray node in each: the trainer node's holds a bridge, every other joins it by a veth
    pair. Every name is unique to this process."""

    ROLES = ("trainer", "rollout", "spare")

    def __init__(self, tmp: Path):
        tag = os.getpid() % 100_000
        self.ns = {role: f"kmn{tag}{role[0]}" for role in self.ROLES}
        subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.ip = {role: f"{subnet}.{i + 1}" for i, role in enumerate(self.ROLES)}
        self.tmp, self.made = tmp, []
        self.env = {**os.environ, **RAY_ENV}

    def link(self) -> None:
        for ns in self.ns.values():
            made = sh("ip", "netns", "add", ns, check=False)
            if made.returncode:  # root without CAP_SYS_ADMIN (some containers): nothing to test with
                pytest.skip(f"`ip netns add` failed, so no network namespaces here: {made.stderr.strip()}")
            self.made.append(ns)
        t = self.ns["trainer"]
        sh("ip", "-n", t, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", t, "addr", "add", f"{self.ip['trainer']}/24", "dev", "br0")
        for dev in ("br0", "lo"):
            sh("ip", "-n", t, "link", "set", dev, "up")
        for role in self.ROLES[1:]:
            ns = self.ns[role]
            sh("ip", "link", "add", f"{ns}p", "netns", t, "type", "veth", "peer", "name", f"{ns}0", "netns", ns)
            sh("ip", "-n", t, "link", "set", f"{ns}p", "master", "br0")
            sh("ip", "-n", t, "link", "set", f"{ns}p", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip[role]}/24", "dev", f"{ns}0")
            sh("ip", "-n", ns, "link", "set", f"{ns}0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def role_of(self, ip: str) -> str:
        return next(role for role, address in self.ip.items() if address == ip)

    def start(self, role: str) -> None:
        """`ray start` of one node in its namespace: its own temp dir (so no other Ray on the machine finds this
        cluster), its IP, 100 MB of object store and its keel resource."""
        args = ["--head", f"--port={PORT}", "--include-dashboard=false", "--num-cpus=2"] if role == "trainer" else [
            f"--address={self.ip['trainer']}:{PORT}", "--num-cpus=1"]
        resource = "keel_trainer" if role == "trainer" else "keel_rollout"
        out = self.exec(role, str(RAY), "start", *args, f"--node-ip-address={self.ip[role]}",
                        f"--resources={json.dumps({resource: 1})}", "--object-store-memory=100000000",
                        f"--temp-dir={self.tmp / role}", "--disable-usage-stats")
        assert out.returncode == 0, out.stdout + out.stderr

    def exec(self, role: str, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns[role], *argv], capture_output=True, text=True,
                              env=self.env, timeout=120)

    def pids(self, role: str) -> list[int]:
        out = sh("ip", "netns", "pids", self.ns[role], check=False).stdout.split()
        return [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]

    def kill(self, role: str) -> None:
        """SIGKILL every process in the node's namespace (Ray's raylet, agents, workers, vLLM), until none is left."""
        for _ in range(50):
            pids = self.pids(role)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        for role in reversed(self.ROLES):
            if self.ns[role] in self.made:
                self.kill(role)
        for ns in self.made:
            sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair, and so the pair, with it
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the multi-node test creates network namespaces: it needs root")
    if shutil.which("ip") is None:
        pytest.skip("the multi-node test needs `ip` (iproute2) to create network namespaces")
    # Short: Ray's unix sockets live under the temp dir, and a socket path may not exceed 107 bytes.
    nodes = Nodes(Path(f"/tmp/kmn{os.getpid()}"))
    try:
        nodes.link()
        for role in nodes.ROLES:
            nodes.start(role)
        yield nodes
    finally:
        nodes.close()


def keel(cluster: Nodes, log: Path, *args: str) -> subprocess.Popen:
    """`keel train` as a driver of the cluster, in the trainer node's namespace."""
    with log.open("w") as out:
        return subprocess.Popen(["ip", "netns", "exec", cluster.ns["trainer"], str(KEEL), "train", *args],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=cluster.env)


def wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-4000:]}") from None


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/step_*/loop_state.json"))


def catch_generate(cluster: Nodes, role: str, after: int, proc: subprocess.Popen, run_dir: Path, log: Path,
                   timeout: float = 240.0) -> psutil.Process:
    """The rollout worker's process on `role`'s node, paused (SIGSTOP) while it runs `generate` once step
    `after`'s checkpoint exists, so that the node is lost mid-step whatever the machine's load."""
    deadline, worker = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before the kill:\n{log.read_text()[-4000:]}"
        if worker is None or not worker.is_running():
            worker = next((p for p in map(psutil.Process, cluster.pids(role))
                           if " ".join(p.cmdline()).startswith("ray::RolloutWorker")), None)
        if worker is not None and checkpoints(run_dir)[-1:] >= [after]:
            try:
                if " ".join(worker.cmdline()).startswith("ray::RolloutWorker.generate"):
                    worker.suspend()
                    return worker
            except psutil.Error:
                worker = None
            time.sleep(0.001)
            continue
        time.sleep(0.05)
    raise AssertionError(f"the rollout worker was not seen in generate on the {role} node after step {after}:\n"
                         f"{log.read_text()[-4000:]}")


def served_the_trainers_weights(m: dict) -> bool:
    """The engine's log-probs of a step's batch equal the trainer's before its update (fp32 both: ~1e-7 measured).
    One mini-batch update of this run moves them by 2e-3..1.5e-2 (`logp_mismatch`, steps 3-5), so an engine a
    version behind would be seen."""
    return m["logp_mismatch_first"] < 1e-5 and m["mismatch/logp_max"] < 1e-4


PLACED = r"keel: placement: trainer rank 0 on (\S+) \((\w+)\), rollout workers on \['(\S+) \((\w+)\)'\]"


def placement_of(proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> tuple[Path, re.Match]:
    """The run directory and the placement line, once keel has printed them."""
    deadline = time.monotonic() + timeout
    while not (placed := re.search(PLACED, log.read_text())) and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)
    assert placed, log.read_text()[-4000:]
    return Path(re.search(r"keel: run directory (\S+)", log.read_text())[1]), placed


def lost(cluster: Nodes, role: str) -> str:
    """The message naming `role`'s node as lost (its Ray node id, then its address)."""
    return rf"rollout worker 0's Ray node \w+ \({re.escape(cluster.ip[role])}\) was lost"


@pytest.mark.slow
def test_rollout_nodes_lost_mid_run(cluster, tmp_path):
    t0 = time.monotonic()
    log = tmp_path / "first.log"
    proc = keel(cluster, log, "configs/quickstart.yaml", f"run.output_dir={tmp_path / 'runs'}",
                f"run.ray_address={cluster.ip['trainer']}:{PORT}", *OVERRIDES)
    run_dir, placed = placement_of(proc, log)
    assert placed[1] == cluster.ip["trainer"] and placed[2] != placed[4], placed[0]
    first = cluster.role_of(placed[3])  # a keel_rollout node: "rollout" or "spare"
    second = {"rollout": "spare", "spare": "rollout"}[first]

    # The worker's node lost mid-step: Ray re-places the worker on the other keel_rollout node; the run goes on.
    catch_generate(cluster, first, KILL_AFTER, proc, run_dir, log)
    replaced_at = checkpoints(run_dir)[-1]
    cluster.kill(first)
    t_kill = time.monotonic()
    catch_generate(cluster, second, replaced_at + 1, proc, run_dir, log)  # a whole step on the second node first
    went_on = time.monotonic() - t_kill
    lost_at = checkpoints(run_dir)[-1]
    assert "restarting it (1 of rollout.max_restarts=3) and re-issuing its share" in log.read_text()

    # Then that node too: no keel_rollout node is left, so the run stops, naming it, and says how to continue.
    cluster.kill(second)
    t_kill = time.monotonic()
    rc = wait(proc, log, 120)
    stopped = time.monotonic() - t_kill
    text = log.read_text()
    assert rc == 1 and re.search(lost(cluster, second), text), text[-4000:]
    assert f"continue with: keel train --resume {run_dir}" in text

    # Every step so far: the worker on another node than the trainer, the weights over the object store.
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, lost_at + 1)), steps
    for m in steps:
        assert m["sync/object_store_workers"] == 1, m  # the worker loaded each version from the object store
        assert served_the_trainers_weights(m), m
    for step in range(1, lost_at + 1):  # each batch sampled by the previous step's published version
        versions = pq.read_table(run_dir / "rollouts" / f"step_{step:06d}.parquet").column("policy_version")
        assert set(versions.to_pylist()) == {step - 1}, step  # the re-issued share's too
    before, after = (load_file(str(run_dir / f"checkpoints/step_{s}/model/model.safetensors")) for s in (1, 2))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the versions synced really differ

    # Resumed while no keel_rollout node is alive: refused before any actor starts, naming the missing resource.
    log = tmp_path / "refused.log"
    rc = wait(keel(cluster, log, "--resume", str(run_dir)), log, 120)
    text = log.read_text()
    assert rc == 2, text[-4000:]  # keel's exit status for a config error
    assert "no alive Ray node has the custom resource 'keel_rollout'" in text, text[-4000:]
    assert "keel: placement:" not in text  # no actor was started

    # A node back: the run resumes from its last checkpoint and ends with every step exactly once.
    cluster.start(second)
    log = tmp_path / "resumed.log"
    rc = wait(keel(cluster, log, "--resume", str(run_dir)), log, 240)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{lost_at}'} at step {lost_at}" in text
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1)), steps  # none lost, none repeated
    assert all(m["sync/object_store_workers"] == 1 and served_the_trainers_weights(m) for m in steps[lost_at:]), steps
    print(f"\nthree nodes: node lost after step {replaced_at}, worker replaced and step {replaced_at + 1} done "
          f"{went_on:.1f} s later; the second lost after step {lost_at}, run stopped {stopped:.1f} s later naming "
          f"it; resumed to step {STEPS}; {time.monotonic() - t0:.0f} s in all")
