"""The jail: the trusted launcher that puts one untrusted program into its own little world.

`rewards.sandbox` starts this file as a script (`python -I jail.py CONFIG`) in a new session and
reads the outcome from a status file. It is deliberately standalone (standard library only, plus
the optional `pyseccomp` binding whose location the host passes in), because it runs before any
isolation exists and must not import project code.

Rule, in "namespaces" mode (Linux, root):
  1. unshare mount, network, pid, ipc and uts namespaces, fork; the child is pid 1 of the new
     pid namespace and dies with the launcher (PR_SET_PDEATHSIG);
  2. build a new root on a small tmpfs: read-only, nosuid, nodev bind mounts of the system and
     interpreter directories, four device nodes, and a size-limited tmpfs `/sandbox` owned by the
     sandbox uid as the only writable place; chroot into it;
  3. fork the program: drop to the unprivileged uid/gid (no supplementary groups, no capabilities,
     no_new_privs), set rlimits, install the seccomp filter, exec the interpreter with an empty
     environment;
  4. wait for it under a wall-clock alarm, write the status, exit: when pid 1 exits the kernel
     kills every process left in the namespace (daemons included).
In "plain" mode (no namespaces) steps 1-2 are skipped, the program runs in a host directory,
and leftovers are killed through the child-subreaper and, when a uid was given, by signalling
every process of that uid.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

DEVICE_NODES = ("null", "zero", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


class WallTimeExceeded(Exception):
    """Raised by the SIGALRM handler to break out of waiting for the program."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _encoded(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_encoded(source), _encoded(target), _encoded(fstype), ctypes.c_ulong(flags),
                       _encoded(data)),
           f"mount {source} on {target}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def enter_namespaces() -> None:
    """Unshare every namespace but the user namespace (we are real root; the uid drop comes later)."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc.unshare(flags), "unshare")


def bind_read_only(source: str, target: str) -> None:
    """Bind `source` at `target`, then remount it read-only: a bind ignores MS_RDONLY on first mount."""
    _mount(source, target, None, MS_BIND)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(cfg: dict) -> str:
    """Assemble the new root under cfg["root_dir"] and return it; see the module docstring, step 2."""
    root = cfg["root_dir"]
    uid, gid = cfg["uid"], cfg["gid"]
    # Mount events must not propagate back to the host's mount table.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("keel-root", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["ro_paths"]:
        inside = root + path
        if os.path.islink(path):
            # Merged-/usr systems make /bin, /lib... symlinks; recreate them rather than follow.
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            os.symlink(os.readlink(path), inside)
        elif os.path.isdir(path):
            os.makedirs(inside, exist_ok=True)
            bind_read_only(path, inside)
        elif os.path.isfile(path):
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            open(inside, "w").close()
            bind_read_only(path, inside)
    os.makedirs(root + "/dev", exist_ok=True)
    for name in DEVICE_NODES:
        open(f"{root}/dev/{name}", "w").close()
        # Device nodes need the mount without MS_NODEV; read-only still lets writes reach /dev/null.
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
        _mount(None, f"{root}/dev/{name}", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    workdir = root + "/sandbox"
    os.makedirs(workdir)
    _mount("keel-work", workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={cfg['limits']['workdir_bytes']},mode=0700,uid={uid},gid={gid}")
    os.symlink("/sandbox", root + "/tmp")
    with open(cfg["program_path"], "rb") as src, open(workdir + "/main.py", "wb") as dst:
        dst.write(src.read())
    os.chown(workdir + "/main.py", uid, gid)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return root


def set_limits(limits: dict) -> None:
    """Apply the rlimits; soft == hard so the program cannot raise them again (CPU gets 1 s grace)."""
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


def install_seccomp(cfg: dict) -> None:
    """Refuse network sockets and namespace/kernel-surface syscalls with EPERM (ENOSYS for clone3).

    The filter is a second line behind the network namespace and the only network barrier in
    plain mode, where every `socket()` is refused (a host Unix socket such as Ray's would
    otherwise be reachable); `socketpair()` stays allowed for in-process plumbing.
    """
    seccomp = cfg.get("seccomp")
    if not seccomp:
        return
    pyseccomp = sys.modules["pyseccomp"]
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    deny = pyseccomp.ERRNO(errno.EPERM)
    if seccomp["deny_all_sockets"]:
        flt.add_rule(deny, "socket")
    else:
        for family in (2, 10, 16, 17):  # AF_INET, AF_INET6, AF_NETLINK, AF_PACKET
            flt.add_rule(deny, "socket", pyseccomp.Arg(0, pyseccomp.EQ, family))
    for name in ("unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "ptrace", "bpf",
                 "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd", "kexec_load",
                 "init_module", "finit_module", "delete_module", "process_vm_readv", "process_vm_writev",
                 "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff", "reboot"):
        flt.add_rule(deny, name)
    flt.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    # clone3 passes its flags in memory a filter cannot read; ENOSYS makes libc fall back to clone.
    flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    flt.load()


def exec_program(cfg: dict, fds: dict[str, int], workdir: str) -> None:
    """In the forked child: become the unprivileged program and exec the interpreter. Never returns."""
    try:
        os.chdir(workdir)
        for target, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            os.dup2(fds[name], target)
        os.closerange(3, 65536)
        set_limits(cfg["limits"])
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        install_seccomp(cfg)
        argv = [cfg["interpreter"], "-I", "-B", "main.py"]
        os.execve(cfg["interpreter"], argv, cfg["env"])
    except BaseException as exc:  # noqa: BLE001 - anything here is a jail failure, report and die
        os.write(2, f"keel-jail: cannot start program: {exc!r}\n".encode())
    os._exit(127)


def kill_uid_processes(uid: int) -> None:
    """Kill every process owned by `uid`: a helper takes that uid and sends SIGKILL to pid -1.

    kill(-1) reaches exactly the processes the sender may signal, i.e. those of its own uid,
    which catches daemons that left the process group in plain mode.
    """
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def reap_children() -> None:
    """Kill and reap the children this (subreaper) process inherited from exited programs."""
    me = str(os.getpid())
    for _ in range(50):
        orphans = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[1] == me:
                    orphans.append(int(entry))
        if not orphans:
            return
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.01)


def supervise(cfg: dict, fds: dict[str, int], workdir: str, in_namespace: bool) -> dict:
    """Run the program under the wall-clock limit and describe how it ended."""
    start = time.monotonic()
    child = os.fork()
    if child == 0:
        exec_program(cfg, fds, workdir)

    def on_alarm(signum, frame):
        raise WallTimeExceeded

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["limits"]["wall_s"])
    status: dict = {"timed_out": False}
    try:
        while True:
            pid, wait_status, usage = os.wait4(-1, 0)
            if pid == child:
                signal.setitimer(signal.ITIMER_REAL, 0)
                status["cpu_s"] = usage.ru_utime + usage.ru_stime
                if os.WIFSIGNALED(wait_status):
                    status["signal"] = os.WTERMSIG(wait_status)
                else:
                    status["exit_code"] = os.WEXITSTATUS(wait_status)
                break
    except WallTimeExceeded:
        status["timed_out"] = True
    status["wall_s"] = time.monotonic() - start
    if in_namespace:
        # pid 1 may signal everything in its namespace; exiting would do the same a moment later.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:  # nothing left to kill
            pass
    else:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if cfg["uid"] is not None:
            kill_uid_processes(cfg["uid"])
        reap_children()
    return status


def open_fds(cfg: dict) -> dict[str, int]:
    """Open the program's stdio files before any isolation hides the host directory they live in."""
    return {
        "stdin": os.open(cfg["stdin_path"], os.O_RDONLY),
        "stdout": os.open(cfg["stdout_path"], os.O_WRONLY | os.O_TRUNC),
        "stderr": os.open(cfg["stderr_path"], os.O_WRONLY | os.O_TRUNC),
    }


def write_status(fd: int, status: dict) -> None:
    os.write(fd, json.dumps(status).encode())
    os.close(fd)


def run_namespaced(cfg: dict, fds: dict[str, int], status_fd: int) -> int:
    """Steps 1-4 of the module docstring; returns the launcher's exit code."""
    enter_namespaces()
    init = os.fork()
    if init:
        _, wait_status = os.waitpid(init, 0)
        return os.waitstatus_to_exitcode(wait_status)
    try:
        # If the launcher died before this was armed, the host's killpg still reaches us: we
        # stay in the launcher's process group.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        build_root(cfg)
        os.chroot(cfg["root_dir"])
        status = supervise(cfg, fds, "/sandbox", in_namespace=True)
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure to the host
        status = {"error": f"{type(exc).__name__}: {exc}"}
    write_status(status_fd, status)
    os._exit(0)


def run_plain(cfg: dict, fds: dict[str, int], status_fd: int) -> int:
    """No namespaces: run in the host work directory; clean up as in the module docstring."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        status = supervise(cfg, fds, cfg["workdir"], in_namespace=False)
    except BaseException as exc:  # noqa: BLE001
        status = {"error": f"{type(exc).__name__}: {exc}"}
    write_status(status_fd, status)
    return 0


def probe_namespaces() -> int:
    """Exit 0 when this process may create the namespaces "namespaces" mode needs."""
    pid = os.fork()
    if pid == 0:
        try:
            enter_namespaces()
            os._exit(0)
        except OSError:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(argv: list[str]) -> int:
    if argv[1] == "--probe":
        return probe_namespaces()
    with open(argv[1]) as f:
        cfg = json.load(f)
    if cfg.get("seccomp"):
        # Import now: after the chroot the module's directory is no longer visible.
        sys.path.insert(0, cfg["seccomp"]["module_dir"])
        importlib.import_module("pyseccomp")
    fds = open_fds(cfg)
    status_fd = os.open(cfg["status_path"], os.O_WRONLY | os.O_TRUNC)
    if cfg["mode"] == "namespaces":
        return run_namespaced(cfg, fds, status_fd)
    return run_plain(cfg, fds, status_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
