"""Run untrusted Python code in a sandbox: one fresh, limited, isolated process tree per execution.

What is isolated, how, and on which platform is documented in `rewards/SECURITY.md`. In short,
there are three modes:
- "namespaces" (Linux, root): the program runs as a random unprivileged uid in new
  mount/network/pid/IPC/UTS namespaces, chrooted into a read-only view of the system and
  interpreter directories with a size-limited tmpfs as its only writable directory;
- "userns" (Linux, any user whose kernel allows unprivileged user namespaces): the same jail built
  inside a new user namespace, where the program is an unprivileged id mapped to the invoking
  user and holds no capability outside the run's own namespaces;
- "plain" (the weak fallback, only with `allow_weak`): no namespaces; the program runs in a host
  directory as the invoking user (a random uid when root) and sees every file that user sees.
In every mode rlimits bound CPU time, address space, processes, file size and open files; a
seccomp filter (when `pyseccomp` is installed; required in plain mode) refuses network sockets,
io_uring and namespace/kernel-surface syscalls; the environment is empty; and every process of
the run is killed and reaped when it ends. The default is the strongest mode the host allows; when
that is plain and weak isolation was not allowed, running a program raises SandboxUnavailable
saying why and what to do.

The launcher that sets this up is `rewards/jail.py`; this module prepares its inputs, waits for the
run under a backstop deadline and turns the outcome into a `SandboxResult`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MIB = 1024 * 1024
JAIL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
MODES = ("namespaces", "userns", "plain")
# The jail enforces the wall-time limit itself; the host only steps in if the jail hangs.
JAIL_GRACE_S = 10.0
# Each execution gets its own uid so RLIMIT_NPROC (counted per uid) bounds just that program.
SANDBOX_UID_RANGE = (1_000_000, 2_000_000_000)
# The program's uid and gid inside its user namespace ("userns"): anything but 0, so it holds no
# capability even there. RLIMIT_NPROC counts per (user namespace, uid), i.e. per run.
USERNS_ID = 1000
# Set to 1/true to allow the weak plain mode where configs cannot pass allow_weak (see SECURITY.md).
ALLOW_WEAK_ENV = "KEEL_SANDBOX_ALLOW_WEAK"
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
    workdir_bytes: int = 64 * MIB  # everything the run writes (/sandbox, /tmp, /dev/shm) in the namespace modes

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


def weak_allowed(allow_weak: bool = False) -> bool:
    """True when the caller or the environment (KEEL_SANDBOX_ALLOW_WEAK) accepts plain mode."""
    return allow_weak or os.environ.get(ALLOW_WEAK_ENV, "").strip().lower() in ("1", "true", "yes")


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def userns_hints() -> str:
    """The kernel settings that commonly refuse unprivileged user namespaces, where set so."""
    hints = []
    if _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        hints.append("user.max_user_namespaces is 0 (set it to e.g. 10000)")
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        hints.append("kernel.unprivileged_userns_clone is 0 (set it to 1)")
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        hints.append("kernel.apparmor_restrict_unprivileged_userns is 1 (set it to 0, or give the "
                     "interpreter an AppArmor profile that allows userns)")
    return "; ".join(hints)


@functools.cache
def isolation_problem(mode: str) -> str | None:
    """Why `mode` cannot run here (None when it can), found by running a trivial program in it."""
    if mode not in MODES:
        return f"unknown isolation {mode!r}; choose one of {', '.join(MODES)}"
    if not sys.platform.startswith("linux"):
        return "the sandbox needs Linux"
    if mode == "namespaces" and os.geteuid() != 0:
        return "namespaces mode needs root (CAP_SYS_ADMIN); userns is its unprivileged form"
    try:
        result = execute("pass", "", SandboxLimits(wall_time_s=30.0), mode, None)
        problem = None if result.ok else f"a trivial program failed: {result.killed_reason or result.stderr[-300:]}"
    except (OSError, RuntimeError) as exc:  # SandboxUnavailable is a RuntimeError
        problem = str(exc)
    if problem is None:
        return None
    return f"{mode} sandbox unavailable: {problem}"


@functools.lru_cache(maxsize=1)
def available_isolation() -> str:
    """The strongest mode this host allows: "namespaces" (root), else "userns", else "plain"."""
    for mode in ("namespaces", "userns"):
        if isolation_problem(mode) is None:
            return mode
    return "plain"


def weak_refusal(requested: bool) -> SandboxUnavailable:
    """The error for plain mode without weak isolation allowed: why, and what to do, first (a
    scoring failure keeps only the start of a message)."""
    allow = (f"accept the weak plain mode (programs run as you) with allow_weak=True / {ALLOW_WEAK_ENV}=1; "
             f"see rewards/SECURITY.md")
    if requested:
        return SandboxUnavailable(f"isolation='plain' is weak: {allow}")
    hints, cause = userns_hints(), isolation_problem("userns")
    return SandboxUnavailable(
        f"code sandbox refused: no isolation here{f' ({hints})' if hints else ''}. Allow unprivileged user "
        f"namespaces, run keel as root, or {allow}." + (f" Cause: {cause}" if cause else ""))


def resolve_isolation(isolation: str | None = None, allow_weak: bool = False) -> str:
    """The mode a run will use: `isolation`, or the strongest available; raises SandboxUnavailable.

    Plain mode, requested or the only one left, needs `allow_weak` (or KEEL_SANDBOX_ALLOW_WEAK=1).
    A training driver can call this at start-up to fail before the first code reward.
    """
    mode = isolation or available_isolation()
    if mode not in MODES:
        raise ValueError(f"isolation must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "plain":
        if not weak_allowed(allow_weak):
            raise weak_refusal(requested=isolation == "plain")
        return mode
    problem = isolation_problem(mode)
    if problem:
        raise SandboxUnavailable(problem)
    return mode


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


def choose_interpreter(mode: str, host_uid: int | None, requested: str | None) -> str:
    """The interpreter to run: the requested one, else this process's base Python.

    When the program's host uid is not ours (root's plain and userns modes run it as a random
    uid, without the bind mounts' root privilege) it must be able to reach the interpreter, so an
    unreachable default falls back to the system Python.
    """
    interpreter = os.path.realpath(requested or sys.executable)
    if mode != "namespaces" and host_uid is not None and not is_world_executable(interpreter):
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


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """[start, end) id ranges of this process's user namespace (/proc/self/uid_map or gid_map)."""
    try:
        with open(path) as f:
            return [(int(inside), int(inside) + int(count)) for inside, _, count in map(str.split, f)]
    except OSError:
        return [(0, 2**32 - 1)]


def spare_uid() -> int | None:
    """A random uid in SANDBOX_UID_RANGE, used as uid and gid, that this user namespace maps.

    In the initial namespace every id is mapped; root of a container's user namespace may have
    none to spare (then None: the program cannot get a uid of its own from here).
    """
    low, high = SANDBOX_UID_RANGE
    spans = [(max(low, u0, g0), min(high, u1, g1)) for u0, u1 in mapped_ranges("/proc/self/uid_map")
             for g0, g1 in mapped_ranges("/proc/self/gid_map")]
    spans = [(start, end) for start, end in spans if start < end]
    if not spans:
        return None
    pick = secrets.randbelow(sum(end - start for start, end in spans))
    for start, end in spans:
        if pick < end - start:
            return start + pick
        pick -= end - start
    raise AssertionError("unreachable")


def program_ids(mode: str) -> tuple[int | None, int | None]:
    """(the program's uid as the jail sets it, the host uid it runs as when not the caller's).

    namespaces: a random uid (root only). userns: USERNS_ID inside, mapped to the caller, or, for
    root, to a random uid of its own. plain: a random uid for root, else the caller.
    """
    uid = spare_uid() if os.geteuid() == 0 else None
    if mode == "namespaces" and uid is None:
        raise SandboxUnavailable(f"no spare uid in {SANDBOX_UID_RANGE} to run the program as (root of a user "
                                 f"namespace that maps none)")
    if mode == "userns":
        return USERNS_ID, uid
    return uid, uid


def jail_config(tmp: str, mode: str, interpreter: str | None, limits: SandboxLimits) -> dict:
    """Everything the jail needs, as the JSON it reads."""
    seccomp_dir = seccomp_module_dir()
    if mode == "plain" and seccomp_dir is None:
        raise SandboxUnavailable("plain mode refuses network only through seccomp; install pyseccomp")
    uid, host_uid = program_ids(mode)
    workdir = os.path.join(tmp, "work") if mode == "plain" else "/sandbox"
    interpreter = choose_interpreter(mode, host_uid, interpreter)
    return {
        "mode": mode,
        "uid": uid,
        "gid": uid,
        "host_uid": host_uid,
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
    if status.get("launcher_signal"):
        return f"sandbox launcher killed by {signal.Signals(status['launcher_signal']).name}"
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


def wait_exited(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for our child `pid` to exit, without reaping it (its pid stays ours)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # kernel < 5.3: poll
        deadline = time.monotonic() + timeout_s
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout_s) * 1000))
    finally:
        os.close(pidfd)


def read_line(stream, timeout_s: float) -> str:
    """One line from a pipe, or "" at EOF or after `timeout_s`."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline().decode(errors="replace") if ready else ""


def kill_lost_inits(config_path: str) -> None:
    """Kill and reap our children still running this config: an init whose launcher died before
    telling us its pid (it is our child through CLONE_PARENT, with the launcher's command line)."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                ours = ppid == me and config_path.encode() in f.read()
        except (OSError, IndexError):
            continue
        if ours:
            os.kill(int(entry), signal.SIGKILL)
            os.waitpid(int(entry), 0)


def run_namespaced(argv: list[str], config_path: str, log, timeout_s: float) -> tuple[int | None, bool]:
    """Start the jail; wait for the init it clones (our child). Returns (init's wait status, backstop hit).

    The wait status is None when the launcher failed before creating the init.
    """
    launcher = subprocess.Popen(argv, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
    init = None
    try:
        line = read_line(launcher.stdout, JAIL_GRACE_S).strip()
        init = int(line) if line.isdigit() else None
    finally:
        if init is None:  # still unreaped, so its session id cannot have been reused
            try:
                os.killpg(launcher.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
        launcher.stdout.close()
    if init is None:
        kill_lost_inits(config_path)
        return None, False
    finished = False
    try:
        finished = wait_exited(init, timeout_s)
    finally:
        if not finished:  # the backstop, or we are being interrupted: the run must not outlive us
            os.kill(init, signal.SIGKILL)
        try:
            wait_status = os.waitpid(init, 0)[1]
        except ChildProcessError:  # reaped behind our back (SIGCHLD ignored): the status file tells
            wait_status = None
    return wait_status, not finished


def run_plain(argv: list[str], log, timeout_s: float) -> tuple[int, bool]:
    """Start the jail, which supervises the program itself. Returns (its wait status, backstop hit)."""
    launcher = subprocess.Popen(argv, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    finished = False
    try:
        finished = wait_exited(launcher.pid, timeout_s)
    finally:
        # Before reaping (the group id stays ours): the session holds the launcher and, unless
        # they called setsid, the program's processes.
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()
    return launcher.returncode, not finished


def execute(code: str, stdin: str, limits: SandboxLimits, mode: str, interpreter: str | None) -> SandboxResult:
    """One run in `mode`, which the caller has chosen; see run_in_sandbox."""
    tmp = tempfile.mkdtemp(prefix="keel-sandbox-")
    try:
        # 0o711: a plain-mode program must traverse into tmp/work but not list or read tmp.
        os.chmod(tmp, 0o711)
        cfg = jail_config(tmp, mode, interpreter, limits)
        write_inputs(cfg, code, stdin)
        config_path = os.path.join(tmp, "jail.json")
        with open(config_path, "w") as f:
            json.dump(cfg, f)
        argv = [sys.executable, "-I", "-S", JAIL_PATH, config_path]
        with open(os.path.join(tmp, "jail.log"), "w+b") as log:
            if mode == "plain":
                wait_status, backstop_hit = run_plain(argv, log, limits.wall_time_s + JAIL_GRACE_S)
            else:
                wait_status, backstop_hit = run_namespaced(argv, config_path, log,
                                                           limits.wall_time_s + JAIL_GRACE_S)
            log.seek(0)
            jail_log = log.read(4096).decode(errors="replace")
        raw_status = read_capped(cfg["status_path"], 65536)
        status = json.loads(raw_status) if raw_status else {}
        if backstop_hit:
            status = {"timed_out": True, "wall_s": limits.wall_time_s + JAIL_GRACE_S}
        elif not status and wait_status is not None and os.WIFSIGNALED(wait_status):
            # Killed from outside (the program cannot reach its launcher in the namespace modes):
            # a failed run with a reason, and nothing left running (see jail.py).
            status = {"launcher_signal": os.WTERMSIG(wait_status)}
        if "error" in status or not status:
            details = " ".join(part for part in (status.get("error", ""), jail_log.strip()) if part)
            raise RuntimeError(f"sandbox jail failed: {details}")
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


def run_in_sandbox(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
                   isolation: str | None = None, interpreter: str | None = None,
                   allow_weak: bool = False) -> SandboxResult:
    """Run Python source `code` with `stdin` under `limits`; see the module docstring for the rule.

    `isolation` forces "namespaces", "userns" or "plain" (default: the strongest available);
    plain mode needs `allow_weak` (or KEEL_SANDBOX_ALLOW_WEAK=1). Raises SandboxUnavailable when
    the isolation cannot be provided, RuntimeError when the jail itself fails; never raises for
    anything the program does.
    """
    mode = resolve_isolation(isolation, allow_weak)
    return execute(code, stdin, limits, mode, interpreter)
