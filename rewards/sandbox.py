"""Run untrusted Python code in a sandbox: one fresh, limited, isolated process tree per execution.

What is isolated, how, and on which platform is documented in `rewards/SECURITY.md`. In short:
on Linux as root ("namespaces" mode) the program runs as a random unprivileged uid in new
mount/network/pid/ipc/uts namespaces, chrooted into a read-only view of the system and
interpreter directories with a size-limited tmpfs as its only writable directory; rlimits bound
CPU time, address space, processes, file size and open files; a seccomp filter (when
`pyseccomp` is installed) refuses network sockets and namespace/kernel-surface syscalls; the
environment is empty; everything left is killed when the program ends. Elsewhere ("plain" mode)
the rlimits, empty environment, throw-away directory, seccomp filter and kill-at-end still apply,
but the host's world-readable files are visible.

The launcher that sets this up is `rewards/jail.py`; this module prepares its inputs, enforces
a backstop deadline and turns the outcome into a `SandboxResult`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MIB = 1024 * 1024
JAIL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
# The jail enforces the wall-time limit itself; the host only steps in if the jail hangs.
JAIL_GRACE_S = 10.0
# Each execution gets its own uid so RLIMIT_NPROC (counted per uid) bounds just that program.
SANDBOX_UID_RANGE = (1_000_000, 2_000_000_000)
# Directories every interpreter needs; the interpreter's own prefix is added per run.
SYSTEM_READ_ONLY_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache")
FALLBACK_INTERPRETER = "/usr/bin/python3"
JAIL_EXEC_FAILED = 127  # exit code of a program the jail could not start (see jail.exec_program)
SIGNAL_XCPU = 24
SIGNAL_XFSZ = 25


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this host."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one execution. `cpu_time_s=None` means ceil(wall_time_s)."""

    wall_time_s: float = 5.0
    cpu_time_s: float | None = None
    memory_bytes: int = 512 * MIB
    max_processes: int = 16
    max_file_bytes: int = 16 * MIB  # also caps the captured stdout and stderr
    max_open_files: int = 64
    workdir_bytes: int = 64 * MIB

    def cpu_seconds(self) -> int:
        return max(1, math.ceil(self.cpu_time_s if self.cpu_time_s is not None else self.wall_time_s))


@dataclass(frozen=True)
class SandboxResult:
    """How one execution ended. `killed_reason` is None when the program exited by itself."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_reason: str | None
    wall_time_s: float
    isolation: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None


@functools.lru_cache(maxsize=1)
def available_isolation() -> str:
    """"namespaces" when this process may create Linux namespaces (root), else "plain"."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "plain"
    probe = subprocess.run([sys.executable, "-I", "-S", JAIL_PATH, "--probe"], env={},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return "namespaces" if probe.returncode == 0 else "plain"


@functools.lru_cache(maxsize=1)
def seccomp_module_dir() -> str | None:
    """Directory holding the `pyseccomp` module, or None when it is not installed."""
    spec = importlib.util.find_spec("pyseccomp")
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(spec.origin)


def is_world_executable(path: str) -> bool:
    """True when any uid can reach and execute `path` (every ancestor directory is o+x)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def choose_interpreter(mode: str, uid: int | None, requested: str | None) -> str:
    """The interpreter to run: the requested one, else this process's base Python.

    In plain mode an unprivileged uid must be able to reach it without the mount tricks of
    namespaces mode, so an unreachable default falls back to the system Python.
    """
    interpreter = os.path.realpath(requested or sys.executable)
    if mode == "plain" and uid is not None and not is_world_executable(interpreter):
        if requested is None and os.path.exists(FALLBACK_INTERPRETER) and is_world_executable(
                FALLBACK_INTERPRETER):
            return os.path.realpath(FALLBACK_INTERPRETER)
        raise SandboxUnavailable(f"interpreter {interpreter} is not reachable by an unprivileged uid")
    return interpreter


def read_only_paths(interpreter: str) -> list[str]:
    """System paths plus the interpreter's prefix (bin/.. holds its library and stdlib)."""
    prefix = os.path.dirname(os.path.dirname(interpreter))
    paths = [p for p in SYSTEM_READ_ONLY_PATHS if os.path.lexists(p)]
    if not any(prefix == p or prefix.startswith(p + "/") for p in paths):
        paths.append(prefix)
    return paths


def jail_config(tmp: str, mode: str, uid: int | None, interpreter: str, limits: SandboxLimits) -> dict:
    """Everything the jail needs, as the JSON it reads."""
    seccomp_dir = seccomp_module_dir()
    if mode == "plain" and seccomp_dir is None:
        raise SandboxUnavailable("plain mode refuses network only through seccomp; install pyseccomp")
    workdir = "/sandbox" if mode == "namespaces" else os.path.join(tmp, "work")
    return {
        "mode": mode,
        "uid": uid,
        "gid": uid,
        "interpreter": interpreter,
        "ro_paths": read_only_paths(interpreter),
        "root_dir": os.path.join(tmp, "root"),
        "workdir": workdir,
        "program_path": os.path.join(tmp, "program.py"),
        "stdin_path": os.path.join(tmp, "stdin"),
        "stdout_path": os.path.join(tmp, "stdout"),
        "stderr_path": os.path.join(tmp, "stderr"),
        "status_path": os.path.join(tmp, "status.json"),
        "env": {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
        "seccomp": None if seccomp_dir is None else {"module_dir": seccomp_dir,
                                                     "deny_all_sockets": mode == "plain"},
        "limits": {
            "wall_s": limits.wall_time_s,
            "cpu_s": limits.cpu_seconds(),
            "memory_bytes": limits.memory_bytes,
            "processes": limits.max_processes,
            "file_bytes": limits.max_file_bytes,
            "open_files": limits.max_open_files,
            "workdir_bytes": limits.workdir_bytes,
        },
    }


def write_inputs(cfg: dict, code: str, stdin: str) -> None:
    """Create the files the jail opens; only the plain-mode work directory belongs to the program."""
    for key, content in (("program_path", code), ("stdin_path", stdin), ("stdout_path", ""),
                         ("stderr_path", ""), ("status_path", "")):
        with open(cfg[key], "w") as f:
            f.write(content)
    os.mkdir(cfg["root_dir"])
    if cfg["mode"] == "plain":
        os.mkdir(cfg["workdir"], 0o700)
        shutil.copy(cfg["program_path"], os.path.join(cfg["workdir"], "main.py"))
        if cfg["uid"] is not None:
            os.chown(cfg["workdir"], cfg["uid"], cfg["gid"])
            os.chown(os.path.join(cfg["workdir"], "main.py"), cfg["uid"], cfg["gid"])


def read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def killed_reason(status: dict, stderr: str, limits: SandboxLimits) -> str | None:
    """Name the limit that ended the program, or None when it exited by itself.

    Python turns some limits into exceptions instead of signals: a failed allocation under
    RLIMIT_AS is a MemoryError, and Python ignores SIGXFSZ so RLIMIT_FSIZE is an OSError "File too
    large". A non-zero exit whose stderr names one of those is reported as that limit.
    """
    if status.get("timed_out"):
        return f"wall time limit exceeded ({limits.wall_time_s:g}s)"
    sig = status.get("signal")
    cpu_limit = limits.cpu_seconds()
    if sig == SIGNAL_XCPU or (sig == signal.SIGKILL and status.get("cpu_s", 0.0) >= cpu_limit):
        return f"cpu time limit exceeded ({cpu_limit}s)"
    if sig == SIGNAL_XFSZ:
        return f"file size limit exceeded ({limits.max_file_bytes} bytes)"
    if sig is not None:
        return f"killed by signal {signal.Signals(sig).name}"
    if status.get("exit_code") and "MemoryError" in stderr:
        return f"memory limit exceeded ({limits.memory_bytes // MIB} MiB)"
    if status.get("exit_code") and "File too large" in stderr:
        return f"file size limit exceeded ({limits.max_file_bytes} bytes)"
    if status.get("exit_code") and "No space left on device" in stderr:
        return f"work directory full ({limits.workdir_bytes // MIB} MiB)"
    return None


def run_in_sandbox(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
                   isolation: str | None = None, interpreter: str | None = None) -> SandboxResult:
    """Run Python source `code` with `stdin` under `limits`; see the module docstring for the rule.

    `isolation` forces "namespaces" or "plain" (default: the strongest available). Raises
    SandboxUnavailable when the isolation cannot be provided, RuntimeError when the jail itself
    fails; never raises for anything the program does.
    """
    mode = isolation or available_isolation()
    if mode == "namespaces" and available_isolation() != "namespaces":
        raise SandboxUnavailable("namespaces mode needs Linux and root (CAP_SYS_ADMIN)")
    uid = secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0]) + SANDBOX_UID_RANGE[0] \
        if os.geteuid() == 0 else None
    tmp = tempfile.mkdtemp(prefix="keel-sandbox-")
    try:
        # 0o711: a plain-mode program must traverse into tmp/work but not list or read tmp.
        os.chmod(tmp, 0o711)
        cfg = jail_config(tmp, mode, uid, choose_interpreter(mode, uid, interpreter), limits)
        write_inputs(cfg, code, stdin)
        config_path = os.path.join(tmp, "jail.json")
        with open(config_path, "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(tmp, "jail.log"), "w+b") as log:
            proc = subprocess.Popen([sys.executable, "-I", "-S", JAIL_PATH, config_path], env={},
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
            backstop_hit = False
            try:
                proc.wait(timeout=limits.wall_time_s + JAIL_GRACE_S)
            except subprocess.TimeoutExpired:
                backstop_hit = True
            finally:
                # The session holds the launcher and, in plain mode, the program's process group.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            log.seek(0)
            jail_log = log.read(4096).decode(errors="replace")
        raw_status = read_capped(cfg["status_path"], 65536)
        status = json.loads(raw_status) if raw_status else {}
        if backstop_hit:
            status = {"timed_out": True, "wall_s": limits.wall_time_s + JAIL_GRACE_S}
        if "error" in status or not status:
            raise RuntimeError(f"sandbox jail failed: {status.get('error', '')} {jail_log}".strip())
        stdout = read_capped(cfg["stdout_path"], limits.max_file_bytes)
        stderr = read_capped(cfg["stderr_path"], limits.max_file_bytes)
        if status.get("exit_code") == JAIL_EXEC_FAILED and stderr.startswith("keel-jail:"):
            raise RuntimeError(f"sandbox jail failed: {stderr.strip()}")
        return SandboxResult(
            stdout=stdout,
            stderr=stderr,
            exit_code=status.get("exit_code"),
            timed_out=bool(status.get("timed_out")),
            killed_reason=killed_reason(status, stderr, limits),
            wall_time_s=float(status.get("wall_s", 0.0)),
            isolation=mode,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
