"""Faults on the real stack: Ctrl-C and SIGTERM, a dead trainer rank, a dead engine, and nothing left behind.

One tiny run (the quickstart's model and task, two trainer ranks, one rollout worker) is shared by the module:
the first test starts `keel train` on it and each later one resumes it, each in its own process with one fault
injected once the run is seen in the phase wanted. Ray titles an actor's process `ray::Class.method` while a
call runs in it, so the phase is read off the process table. So that "during the phase" holds whatever the
machine's load, the process holding the phase is paused (SIGSTOP) for the instant the fault is injected and
let go (SIGCONT) afterwards. Each test lists the pids of the run's process tree while it runs (keel, Ray's
head processes and agents, the actors, vLLM's) and asserts that none is alive after the exit.

The tests run in file order on the same run directory; the last one takes the run to its end, so every step
must appear exactly once in metrics.jsonl, and every step's batch be complete, after three stopped processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from rl.loop.metrics import read_metrics

slow = pytest.mark.slow  # every test here but the first two
ROOT = Path(__file__).parent.parent
KEEL = Path(sys.executable).parent / "keel"
STEPS, PROMPTS, G = 8, 4, 4  # steps to spare: a fault lands in the first one it can
OVERRIDES = [
    f"run.steps={STEPS}", "run.checkpoint_every=1", "run.keep_checkpoints=10", "run.wandb_mode=disabled",
    "data.train_size=64", "data.eval_size=4", "sft.steps=0", f"rollout.prompts_per_step={PROMPTS}",
    f"rollout.group_size={G}", "rollout.max_tokens=4", "grpo.mini_batch_size=8", "trainer.num_ranks=2",
]
STOP_S = 20.0  # a signalled or failed run exits within this (a clean stop measured 2-6 s on 2 busy cores)
GONE_S = 5.0  # and every process of it is gone this long after its exit
DETECT_S = 15.0  # a dead engine is reported within this


def test_call_deadline_scales_with_decode_steps():
    from rollout.liveness import call_deadline

    assert call_deadline(300.0, 0.5, 16, 1, 256) == 308.0
    assert call_deadline(300.0, 0.5, 16, 513, 256) == 300.0 + 0.5 * 16 * 3  # three waves of 256 sequences
    assert call_deadline(300.0, 0.5, 0, 1, 1) == 300.0  # no sampling (a weight load): timeout_s alone


def test_exit_cause_names_the_signal():
    from rollout.liveness import exit_cause

    assert exit_cause(-9) == "killed by signal 9 (SIGKILL: the OOM killer, or kill -9)"
    assert exit_cause(-15) == "killed by signal 15" and exit_cause(1) == "exited with code 1"


class KeelRun:
    """A process (`keel train`) in its own session, its output in a file, and every pid its tree ever had."""

    def __init__(self, argv: list[str], log: Path):
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, tuple[float, str]] = {}  # pid -> (create time, command line)

    def snapshot(self) -> list[tuple[psutil.Process, str]]:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        found = []
        for p in procs:
            try:
                cmd = " ".join(p.cmdline())
                self.seen.setdefault(p.pid, (p.create_time(), cmd))
                found.append((p, cmd))
            except psutil.Error:
                pass
        return found

    def actors(self, timeout: float = 300.0) -> tuple[psutil.Process, list[psutil.Process]]:
        """The rollout worker's process and the trainer ranks' (Ray titles them ray::RolloutWorker...,
        ray::TrainerWorker...), once all have started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running("its actors started")
            procs = self.snapshot()
            workers = [p for p, cmd in procs if cmd.startswith("ray::RolloutWorker")]
            ranks = [p for p, cmd in procs if cmd.startswith("ray::TrainerWorker")]
            if len(workers) == 1 and len(ranks) == 2:
                return workers[0], ranks
            time.sleep(0.2)
        raise AssertionError(f"the actors did not start within {timeout} s:\n{self.tail()}")

    def catch(self, procs: list[psutil.Process], titles: tuple[str, ...], timeout: float = 120.0,
              when=lambda: True) -> tuple[psutil.Process, str]:
        """Pause (SIGSTOP) the first of `procs` seen running a call titled one of `titles` once `when()` holds;
        returns it and its title. Only these pids are polled, so a call of a few milliseconds is caught."""
        deadline, next_snapshot = time.monotonic() + timeout, 0.0
        while time.monotonic() < deadline:
            if time.monotonic() > next_snapshot:  # the tree's pids, now and then
                self.check_running(f"{titles}")
                self.snapshot()
                next_snapshot = time.monotonic() + 0.5
                ready = when()
            for p in procs if ready else ():
                try:
                    title = " ".join(p.cmdline()).strip()
                except psutil.Error:
                    continue
                if title.startswith(titles):
                    p.suspend()
                    return p, title
            time.sleep(0.001)
        raise AssertionError(f"no {titles} within {timeout} s:\n{self.tail()}")

    def check_running(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the run exited ({self.proc.returncode}) before {what}:\n{self.tail()}")

    def run_dir(self, timeout: float = 300.0) -> Path:
        """The run directory, as keel prints it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running("naming its run directory")
            found = re.search(r"keel: run directory (\S+)", self.log.read_text())
            if found:
                return Path(found.group(1))
            time.sleep(0.2)
        raise AssertionError(f"no run directory within {timeout} s:\n{self.tail()}")

    def wait_exit(self, timeout: float) -> float:
        """Seconds until the process exits (fails past `timeout`, killing what is left of the run)."""
        t0 = time.monotonic()
        while self.proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                self.kill_all()
                raise AssertionError(f"still running {timeout} s later:\n{self.tail()}")
            self.snapshot()
            time.sleep(0.1)
        return time.monotonic() - t0

    def alive(self) -> list[str]:
        left = []
        for pid, (created, cmd) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {cmd[:100]}")
            except psutil.Error:
                pass
        return left

    def leftovers(self) -> list[str]:
        """The run's processes still alive GONE_S after its exit."""
        deadline = time.monotonic() + GONE_S
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.alive()

    def kill_all(self) -> None:
        """Teardown after a failed test: only this run's own processes, by pid."""
        for line in self.alive():
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except OSError:
                pass

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The run directory (set by the first test) and every run started, for teardown."""
    state = {"out": tmp_path_factory.mktemp("faults"), "dir": None, "runs": []}
    yield state
    for run in state["runs"]:
        run.kill_all()


def start(shared: dict, name: str) -> KeelRun:
    if shared["dir"] is None and shared["runs"]:
        pytest.skip("the shared run was not created")
    args = ["--resume", str(shared["dir"])] if shared["dir"] else [
        "configs/quickstart.yaml", f"run.output_dir={shared['out']}", *OVERRIDES]
    run = KeelRun([str(KEEL), "train", *args], shared["out"] / f"{name}.log")
    shared["runs"].append(run)
    return run


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/step_*/loop_state.json"))


def step_records(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


def resume(process: psutil.Process) -> None:
    """SIGCONT, if the process still exists."""
    try:
        process.resume()
    except psutil.NoSuchProcess:
        pass


def stopped_by_signal(run: KeelRun, phase: str, sig: signal.Signals, group: bool = False) -> None:
    """Send `sig` while `phase` (rollout, update, sync) runs; the run exits within STOP_S saying where its
    checkpoint is and how to continue, and leaves nothing behind."""
    run_dir = run.run_dir()
    worker, ranks = run.actors()
    titles, procs = {"rollout": (("ray::RolloutWorker.generate",), [worker]),
                     "update": (("ray::TrainerWorker.grpo_step",), ranks),
                     # rank 0 publishes the weights, then the worker loads them: both are the sync
                     "sync": (("ray::TrainerWorker.publish_weights", "ray::RolloutWorker.update_weights"),
                              [worker, *ranks])}[phase]
    victim, title = run.catch(procs, titles, when=lambda: bool(checkpoints(run_dir)))
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(run.proc.pid, sig)  # Ctrl-C reaches keel's whole process group
    time.sleep(0.5)
    resume(victim)
    took = run.wait_exit(STOP_S) + 0.5
    left = run.leftovers()
    print(f"\n{sig.name} during {phase} ({title}): exit after {took:.1f} s (bound {STOP_S}), rc "
          f"{run.proc.returncode}, {len(run.seen)} pids seen, {len(left)} left")
    assert run.proc.returncode == 128 + sig, run.tail()
    latest = checkpoints(run_dir)[-1]
    assert f"interrupted ({sig.name}); last checkpoint: {run_dir / 'checkpoints' / f'step_{latest}'}" in run.tail()
    assert f"continue with: keel train --resume {run_dir}" in run.tail()
    assert not left, left
    assert time.monotonic() - t0 < STOP_S + GONE_S
    records = step_records(run_dir)
    assert len(records) == len(set(records)), records  # a step is never recorded twice


@slow
def test_ctrl_c_during_rollout_stops_the_run(shared):
    run = start(shared, "sigint_rollout")
    shared["dir"] = run.run_dir()
    stopped_by_signal(run, "rollout", signal.SIGINT, group=True)


@slow
def test_sigterm_during_update_stops_the_run(shared):
    resumed_at = checkpoints(shared["dir"])[-1]
    run = start(shared, "sigterm_update")
    stopped_by_signal(run, "update", signal.SIGTERM)
    assert f"resumed from {shared['dir'] / 'checkpoints' / f'step_{resumed_at}'}" in run.tail()


@slow
def test_dead_trainer_rank_stops_the_run_naming_it(shared):
    run = start(shared, "rank_death")
    _, ranks = run.actors()
    victim, _ = run.catch(ranks, ("ray::TrainerWorker.grpo_step",))
    t0 = time.monotonic()
    victim.kill()
    took = run.wait_exit(STOP_S)
    left = run.leftovers()
    print(f"\ntrainer rank killed during grpo_step: exit after {took:.1f} s (bound {STOP_S}), {len(left)} left")
    assert run.proc.returncode == 1, run.tail()
    assert re.search(rf"keel: error: trainer rank [01] of 2 \(pid {victim.pid}\) died during grpo_step", run.tail())
    assert f"continue with: keel train --resume {shared['dir']}" in run.tail()
    assert not left, left
    assert time.monotonic() - t0 < STOP_S + GONE_S


@slow
def test_dead_engine_mid_batch_is_restarted_and_the_run_completes(shared):
    """The process holding the engine (keel's CPU default: the worker's own; else vLLM's EngineCore) is killed
    while the worker generates a step's batch; the worker comes back at the current weights, the share is
    re-issued, and the run ends with every step once and every step's batch complete."""
    run = start(shared, "engine_death")
    worker, _ = run.actors()
    worker, _ = run.catch([worker], ("ray::RolloutWorker.generate",))
    cores = [p for p, cmd in run.snapshot() if cmd.startswith("VLLM::EngineCore") and worker in p.parents()]
    (cores or [worker])[0].kill()
    t0 = time.monotonic()
    resume(worker)
    while "rollout worker 0:" not in run.tail() and time.monotonic() - t0 < DETECT_S:
        run.snapshot()
        time.sleep(0.1)
    detected = time.monotonic() - t0
    took = run.wait_exit(600)
    left = run.leftovers()
    print(f"\nengine killed mid-batch ({'EngineCore' if cores else 'in the worker process'}): reported after "
          f"{detected:.1f} s (bound {DETECT_S}), run finished {took:.0f} s after the kill, {len(left)} left")
    assert detected < DETECT_S, run.tail()
    assert "re-issuing its share" in run.tail()
    assert run.proc.returncode == 0, run.tail()
    assert step_records(shared["dir"]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        rows = pq.read_table(shared["dir"] / "rollouts" / f"step_{step:06d}.parquet",
                             columns=["prompt_index", "sample_index"]).to_pylist()
        keys = {(r["prompt_index"], r["sample_index"]) for r in rows}
        assert len(rows) == len(keys) == PROMPTS * G, (step, rows)  # none lost, none twice
    assert not left, left


DRIVER = """
import sys, time
from rl.loop.driver import ray_session
with ray_session("", 2):
    print("ready", flush=True)
    time.sleep(600)
"""


@slow
def test_killed_driver_leaves_no_ray_process_behind(tmp_path):
    """kill -9 of keel itself (no handler runs): Ray's agents and monitors would outlive it for minutes; the
    watcher started beside the local Ray (rl/loop/reaper.py) stops them. Ray alone (no actors): the phase makes
    no difference to a process that is killed outright."""
    run = KeelRun([sys.executable, "-c", DRIVER], tmp_path / "driver.log")
    deadline = time.monotonic() + 120
    while "ready" not in run.log.read_text() and time.monotonic() < deadline:
        run.check_running("its Ray session started")
        time.sleep(0.2)
    time.sleep(2.0)  # the watcher lists the session's processes every REFRESH_S
    ray_procs = [cmd for _, cmd in run.snapshot() if "ray" in cmd.lower()]
    run.proc.kill()
    t0 = time.monotonic()
    run.proc.wait()
    left = run.leftovers()
    print(f"\nkill -9 of a driver: {len(ray_procs)} Ray processes, {len(left)} left {time.monotonic() - t0:.1f} s "
          "later")
    assert len(ray_procs) >= 5, ray_procs  # GCS, raylet, the agents and monitors at least
    assert not left, left


# ---- one rollout worker with vLLM's engine core in its own process (vLLM's default; the hang) ----------

ENGINE = dict(max_model_len=64, kv_cache_space_gib=1, gpu_memory_utilization=0.05)
BATCH = [[1, 3 + i, 4 + i] for i in range(8)]
SAMPLING = dict(n=2, top_k=0, top_p=1.0, max_tokens=8, seed=3)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import ray
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from rl.model.presets import preset
    from rollout.client import RolloutClient

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_v32")
    DeepseekV32ForCausalLM(DeepseekV32Config(**preset("tiny"))).save_pretrained(path)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}
    c = RolloutClient(str(path), 1, ENGINE, ray_options={"runtime_env": env}, max_restarts=3)
    c.update_weights(c_tensors(path), 1)  # a restarted worker must be brought back to version 1
    yield c
    c.shutdown()
    ray.shutdown()


def c_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def engine_core(client) -> psutil.Process:
    import ray

    state = ray.get(client.workers[0].ping.remote())
    assert state["engine_pids"] != [state["pid"]], "the engine core runs in the worker's process"
    return psutil.Process(state["engine_pids"][0])


def assert_complete(batch) -> None:
    keys = list(zip(batch["prompt_index"].to_pylist(), batch["sample_index"].to_pylist(), strict=True))
    assert keys == [(i, s) for i in range(len(BATCH)) for s in range(SAMPLING["n"])]  # none lost, none twice
    assert set(batch["policy_version"].to_pylist()) == {1}


def generate_with(client, fault, after_s: float = 1.0):
    """client.generate on BATCH while `fault` runs `after_s` into it; returns (batch, seconds)."""
    timer = threading.Timer(after_s, fault)
    t0 = time.monotonic()
    timer.start()
    try:
        return client.generate(BATCH, SAMPLING, 1), time.monotonic() - t0
    finally:
        timer.join()


@slow
def test_killed_engine_core_is_restarted_at_the_current_weights(client):
    import ray

    core = engine_core(client)
    core.suspend()  # the batch cannot finish before the kill lands
    batch, took = generate_with(client, core.kill)
    print(f"\nEngineCore killed 1 s into a batch: the batch completed {took:.1f} s after it started")
    assert client.restarts == [1] and client.reissued == 1
    assert_complete(batch)
    assert ray.get(client.workers[0].ping.remote())["version"] == 1
    assert engine_core(client).pid != core.pid


@slow
def test_hung_engine_misses_its_deadline_and_is_restarted(client):
    core = engine_core(client)
    core.suspend()  # alive but never answers: only the deadline can tell
    saved = client.timeout_s, client.timeout_per_token_s

    def restore() -> None:  # the short deadline is the hung call's; the re-issued one (a fresh engine) gets the usual
        client.timeout_s, client.timeout_per_token_s = saved

    client.timeout_s, client.timeout_per_token_s = 3.0, 0.0
    try:
        batch, took = generate_with(client, restore, after_s=5.0)
    finally:
        restore()
    print(f"\nhung engine, 3 s deadline: the batch completed {took:.1f} s after it started")
    assert client.restarts == [2]
    assert_complete(batch)
    time.sleep(2.0)
    assert not psutil.pid_exists(core.pid) or core.status() == psutil.STATUS_ZOMBIE, "the hung core was left behind"


@slow
def test_a_worker_past_max_restarts_stops_the_run_naming_it(client):
    from rollout.liveness import RolloutWorkerFailed

    n = client.max_restarts = client.restarts[0]  # the next failure is one too many
    core = engine_core(client)
    core.suspend()
    cause = rf"vLLM engine core process {core.pid} \(\S+\) killed by signal 9"
    with pytest.raises(RolloutWorkerFailed, match=rf"rollout worker 0 failed {n + 1} times, more than "
                                                  rf"rollout\.max_restarts={n}; last cause: {cause}"):
        generate_with(client, core.kill)
