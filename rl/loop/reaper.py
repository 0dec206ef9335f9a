"""A watcher that outlives keel's driver and stops what is left of the local Ray session it started.

Ray's GCS server and raylet die with the driver that started them, and the workers (vLLM's engine processes
with them) once the raylet is gone; Ray's dashboard and runtime-environment agents, autoscaler monitor and log
monitor do not: after a `kill -9` of the driver they were seen alive minutes later. `Watcher(session_dir)`
starts a small process that reads a pipe held by the driver and, every `REFRESH_S`, lists the driver's
descendants. End of file on the pipe means the driver is gone, however it ended: the watcher stops every
process it listed that still runs (the same process: its start time is compared), and any of Ray's own
programs whose command line names the session's directory, then exits. A driver that stops normally closes
the pipe after `ray.shutdown()` (`Watcher.close`), so stragglers go the same way.

Run as `python -m rl.loop.reaper SESSION_DIR DRIVER_PID`.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

import psutil

REFRESH_S = 2.0


class Watcher:
    """The watcher process of one Ray session; `close()` when the session is shut down."""

    def __init__(self, session_dir: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "rl.loop.reaper", session_dir, str(os.getpid())],
                                     stdin=subprocess.PIPE, start_new_session=True)  # Ctrl-C's group is keel's

    def close(self, timeout_s: float = 10.0) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Ray's own processes whose command line names `session_dir` (not, say, a user's `less` of a log there)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if p.pid != os.getpid() and is_ray_or_vllm(argv) and session_dir in " ".join(argv):
            found.append(p)
    return found


def is_ray_or_vllm(argv: list[str]) -> bool:
    """Ray's programs (under the ray package), its workers and agents (titled ray::...), vLLM's engine processes
    (VLLM::...); not the driver's other children (wandb's service, the sandbox's programs)."""
    return bool(argv) and (argv[0].startswith(("ray::", "VLLM::")) or any("/ray/" in a for a in argv[:3]))


def descendants(pid: int) -> dict[int, psutil.Process]:
    """The Ray and vLLM processes under `pid`."""
    found = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    for p in children:
        try:
            if p.pid != os.getpid() and is_ray_or_vllm(p.cmdline()):
                found[p.pid] = p
        except psutil.Error:
            pass
    return found


def sweep(procs: list[psutil.Process], grace_s: float = 3.0) -> int:
    """SIGTERM `procs` (psutil checks each is still the process it was), SIGKILL those alive `grace_s` later;
    returns how many were still running."""
    alive = []
    for p in procs:
        try:
            if p.is_running():
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(alive)


def main() -> None:
    session_dir, driver = sys.argv[1], int(sys.argv[2])
    known: dict[int, psutil.Process] = {}
    while True:
        known.update(descendants(driver))
        readable, _, _ = select.select([sys.stdin], [], [], REFRESH_S)
        if readable and not sys.stdin.buffer.read1(4096):  # end of file: the driver closed the pipe, or died
            break
    sweep([*known.values(), *session_processes(session_dir)])


if __name__ == "__main__":
    main()
