"""The jail: the trusted launcher that puts one untrusted program into its own little world.

`rewards.sandbox` starts this file as a script (`python -I -S jail.py CONFIG`) in a new session and
reads the outcome from a status file. It is deliberately standalone (standard library only, plus
the optional `pyseccomp` binding whose location the host passes in), because it runs before any
isolation exists and must not import project code.

Rule, in the namespace modes ("namespaces": the host runs as root; "userns": any user, built on an
unprivileged user namespace):
  1. the launcher unshares the mount, network, pid, IPC and UTS namespaces; in "userns" it first
     creates a user namespace in which one unprivileged id (not 0) maps to the invoking user, so
     it holds capabilities over the new namespaces only;
  2. it clones the init with CLONE_PARENT, prints the init's pid and exits. The init is pid 1 of
     the new pid namespace *and a direct child of the scoring process*, which reaps it: whoever
     kills it, nothing is left to become an orphan or a zombie of the host's pid 1. The init dies
     with the scoring thread (PR_SET_PDEATHSIG);
  3. the init builds a new root on a small tmpfs: read-only, nosuid, nodev bind mounts of the
     system and interpreter directories, four device nodes, and a size-limited tmpfs `/sandbox`
     owned by the program's id as the only writable place (`/tmp` and `/dev/shm` point there, so
     its size= bounds everything the run writes); it chroots into it;
  4. it forks the program: the program's uid/gid (no supplementary groups, except those an
     unprivileged user namespace may not drop; no capabilities; no_new_privs), rlimits, the
     seccomp filter, the interpreter exec'd with an empty environment;
  5. it waits under the wall-clock limit, SIGKILLs every process of the namespace, reaps them all,
     writes the status and exits. When the init exits, for whatever reason (killed included), the
     kernel kills whatever is left in its pid namespace: setsid, double forks and ignored signals
     do not help a program outlive its run.
In "plain" mode (the weak fallback: no namespaces) steps 1-3 are skipped: the launcher supervises
the program in a host directory as a child subreaper, and at the end kills and reaps every
descendant (orphans are reparented to it) and, when the host is root, every process of the
program's uid.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import platform
import resource
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_PARENT = 0x00008000
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                   CLONE_NEWNET)
# clone(2)'s number; its first argument is the flags on both (the other arguments stay 0: fork-like).
SYS_CLONE = {"x86_64": 56, "aarch64": 220}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
# statvfs f_flag bits that a remount in a user namespace must repeat (the kernel locks them).
ST_TO_MS = ((os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
            (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
            (os.ST_RELATIME, MS_RELATIME))

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522

AF_UNIX = 1
DEVICE_NODES = ("null", "zero", "random", "urandom")
# Syscalls the program never needs and that reach kernel surface, other namespaces or other
# processes, or create kernel objects that could outlive the run (SysV IPC, POSIX message queues,
# keys) or open sockets the socket() rule never sees (io_uring's IORING_OP_SOCKET).
DENIED_SYSCALLS = (
    "unshare", "setns", "chroot", "pivot_root", "mount", "umount2", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "open_tree_attr",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "io_setup",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease", "kcmp",
    "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init", "lookup_dcookie",
    "keyctl", "add_key", "request_key",
    "shmget", "msgget", "semget", "mq_open",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon", "swapoff",
    "reboot", "acct", "quotactl",
    "open_by_handle_at", "name_to_handle_at",
)
# Numbers of the newer ones (shared by every architecture since 424), for a libseccomp too old to
# know their names: an unknown name must not silently leave a hole in the filter.
NEW_SYSCALL_NUMBERS = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
                       "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
                       "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
                       "process_mrelease": 448, "open_tree_attr": 467}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


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


def namespace_flags(mode: str) -> int:
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    return flags | CLONE_NEWUSER if mode == "userns" else flags


def enter_namespaces(cfg: dict) -> None:
    """Step 1: new namespaces for the children of this process; in "userns" map the program's id.

    Root in "userns" mode (a host that refuses root the plain namespaces, e.g. a container without
    CAP_SYS_ADMIN) first becomes the run's random unprivileged uid, so that the program is never
    host uid 0 (which RLIMIT_NPROC would not bound).
    """
    if cfg["mode"] == "userns" and cfg["host_uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["host_uid"], cfg["host_uid"], cfg["host_uid"])
        os.setresuid(cfg["host_uid"], cfg["host_uid"], cfg["host_uid"])
        _prctl(PR_SET_DUMPABLE, 1)  # a uid change hands /proc/self to root; we must write its maps
    host_uid, host_gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(namespace_flags(cfg["mode"])), "unshare")
    if cfg["mode"] == "userns":
        # An unprivileged process may map exactly one id: its own. setgroups must be denied first.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{cfg['uid']} {host_uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{cfg['gid']} {host_gid} 1")


def clone_init() -> int:
    """Step 2: fork-like clone whose child gets this process's parent (the scoring process)."""
    number = SYS_CLONE.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"namespace modes support x86_64 and aarch64, not {platform.machine()}")
    zero = ctypes.c_long(0)  # explicit longs: a bare 0 goes through varargs as a 32-bit int
    pid = _libc.syscall(ctypes.c_long(number), ctypes.c_long(CLONE_PARENT | signal.SIGCHLD), zero, zero, zero,
                        zero)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def mount_flags(path: str) -> int:
    """The flags of the mount holding `path`, as mount(2) flags (atime mode included)."""
    st_flags = os.statvfs(path).f_flag
    flags = 0
    for st_bit, ms_bit in ST_TO_MS:
        if st_flags & st_bit:
            flags |= ms_bit
    if not flags & (MS_NOATIME | MS_RELATIME):
        flags |= MS_STRICTATIME
    return flags


def bind_read_only(source: str, target: str, devices: bool = False) -> None:
    """Bind `source` at `target`, then remount it read-only (a bind ignores MS_RDONLY on first mount).

    The remount repeats the source mount's own flags: in a user namespace the kernel refuses a
    remount that would clear a flag (nosuid, noexec, an atime mode) the host set.
    """
    try:
        _mount(source, target, None, MS_BIND)
    except OSError as exc:
        # A user namespace may not bind a directory alone when host mounts sit below it (that
        # would reveal what they cover); bind the whole tree instead.
        if exc.errno != errno.EINVAL:
            raise
        _mount(source, target, None, MS_BIND | MS_REC)
    flags = mount_flags(source) | MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
    _mount(None, target, None, flags if devices else flags | MS_NODEV)


def build_root(cfg: dict) -> str:
    """Assemble the new root under cfg["root_dir"] and return it; see the module docstring, step 3."""
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
        # Device nodes need a mount without MS_NODEV; read-only still lets writes reach /dev/null.
        bind_read_only(f"/dev/{name}", f"{root}/dev/{name}", devices=True)
    workdir = root + "/sandbox"
    os.makedirs(workdir)
    _mount("keel-work", workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={cfg['limits']['workdir_bytes']},mode=0700,uid={uid},gid={gid}")
    # Every place a program expects to write is the one size-limited tmpfs.
    os.symlink("/sandbox", root + "/tmp")
    os.symlink("/sandbox", root + "/dev/shm")
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
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))


def drop_capabilities() -> None:
    """Empty every capability set. exec would drop them for a non-root id anyway; this says so."""
    data = (CapData * 2)()
    _check(_libc.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")


def add_denial(flt, action: int, name: str) -> None:
    """Deny `name`, by number when libseccomp does not know the name."""
    try:
        flt.add_rule(action, name)
    except (OSError, ValueError, RuntimeError):
        if name not in NEW_SYSCALL_NUMBERS:
            raise
        flt.add_rule(action, NEW_SYSCALL_NUMBERS[name])


def install_seccomp(cfg: dict) -> None:
    """Refuse sockets other than Unix ones, and DENIED_SYSCALLS, with EPERM (ENOSYS for clone3).

    In the namespace modes the filter is a second line behind the empty network namespace; in
    plain mode it is the only network barrier, so every `socket()` is refused there (a host Unix
    socket such as Ray's would otherwise be reachable). `socketpair()` stays allowed for Unix
    sockets (in-process plumbing).
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
        # Every family but AF_UNIX: inet, netlink, packet, and also vsock (not namespaced: it
        # reaches the hypervisor), AF_ALG (kernel crypto), bluetooth, ...
        flt.add_rule(deny, "socket", pyseccomp.Arg(0, pyseccomp.NE, AF_UNIX))
    flt.add_rule(deny, "socketpair", pyseccomp.Arg(0, pyseccomp.NE, AF_UNIX))
    for name in DENIED_SYSCALLS:
        add_denial(flt, deny, name)
    for flag in NAMESPACE_FLAGS:
        flt.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory a filter cannot read; ENOSYS makes libc fall back to clone.
    add_denial(flt, pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    flt.load()


def exec_program(cfg: dict, fds: dict[str, int], workdir: str) -> None:
    """In the forked child: become the unprivileged program and exec the interpreter. Never returns."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the supervisor's mask would survive exec
        os.chdir(workdir)
        for target, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            os.dup2(fds[name], target)
        os.closerange(3, 65536)
        set_limits(cfg["limits"])
        if cfg["uid"] is not None:
            if cfg["mode"] != "userns":  # a user namespace has setgroups denied and no other groups
                os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
            drop_capabilities()
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        install_seccomp(cfg)
        argv = [cfg["interpreter"], "-I", "-B", "main.py"]
        os.execve(cfg["interpreter"], argv, cfg["env"])
    except BaseException as exc:  # noqa: BLE001 - anything here is a jail failure, report and die
        os.write(2, f"keel-jail: cannot start program: {exc!r}\n".encode())
    os._exit(127)


def reap(block: bool) -> list[tuple[int, int, resource.struct_rusage]]:
    """Reap exited children: all that are ready, or (block) until none is left."""
    reaped = []
    while True:
        try:
            pid, wait_status, usage = os.wait4(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, wait_status, usage))


def wait_for_program(child: int, wall_s: float) -> dict:
    """Wait for the program under the wall-clock limit, reaping any other child on the way.

    SIGCHLD is blocked and waited for with sigtimedwait, so the supervisor installs no signal
    handler: a program sharing its id (userns) can then signal it only with signals the kernel
    drops for a namespace init, and a stray SIGCHLD only wakes the loop.
    """
    deadline = time.monotonic() + wall_s
    while True:
        for pid, wait_status, usage in reap(block=False):
            if pid == child:
                status: dict = {"timed_out": False, "cpu_s": usage.ru_utime + usage.ru_stime}
                if os.WIFSIGNALED(wait_status):
                    status["signal"] = os.WTERMSIG(wait_status)
                else:
                    status["exit_code"] = os.WEXITSTATUS(wait_status)
                return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"timed_out": True}
        signal.sigtimedwait([signal.SIGCHLD], remaining)


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


def descendants(root_pid: int) -> list[int]:
    """Host pids below `root_pid`, from /proc (plain mode only: the namespace modes have no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, frontier = [], [root_pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found.extend(below)
        frontier.extend(below)
    return found


def kill_descendants() -> None:
    """Plain mode: SIGKILL and reap every descendant until none is left.

    As a child subreaper this process inherits every orphan of the program's tree, setsid or
    not, so "no child left" means nothing of the run is alive. Each round kills all it sees;
    processes forked meanwhile are seen in the next round.
    """
    me = os.getpid()
    for _ in range(1000):
        pids = descendants(me)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap(block=False)
        time.sleep(0.001)
    reap(block=True)


def supervise(cfg: dict, fds: dict[str, int], workdir: str, in_namespace: bool) -> dict:
    """Run the program under the wall-clock limit, then kill and reap everything it left."""
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    start = time.monotonic()
    child = os.fork()
    if child == 0:
        exec_program(cfg, fds, workdir)
    status = wait_for_program(child, cfg["limits"]["wall_s"])
    status["wall_s"] = time.monotonic() - start
    if in_namespace:
        # pid 1 may signal everything in its namespace; kill(-1) is atomic against fork, and
        # every process of the namespace is our descendant, so reaping until ECHILD ends them all.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:  # nothing left to kill
            pass
        reap(block=True)
    else:
        if cfg["uid"] is not None:
            kill_uid_processes(cfg["uid"])
        kill_descendants()
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


def run_init(cfg: dict, fds: dict[str, int], status_fd: int) -> None:
    """Steps 3-5 of the module docstring, as pid 1 of the run's namespaces. Never returns."""
    try:
        # Die with the scoring thread that waits for us (our parent since CLONE_PARENT).
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # No ptrace-like access (pidfd_getfd, /proc/1/mem) by a program that shares our id.
        _prctl(PR_SET_DUMPABLE, 0)
        # Python installs a SIGINT handler; a namespace init must have none (see wait_for_program).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        devnull = os.open("/dev/null", os.O_WRONLY)
        os.dup2(devnull, 1)  # release the pipe the host reads our pid from
        os.close(devnull)
        build_root(cfg)
        os.chroot(cfg["root_dir"])
        os.chdir("/")
        status = supervise(cfg, fds, "/sandbox", in_namespace=True)
    except BaseException as exc:  # noqa: BLE001 - report any set-up failure to the host
        status = {"error": f"{type(exc).__name__}: {exc}"}
    write_status(status_fd, status)
    os._exit(0)


def run_namespaced(cfg: dict, fds: dict[str, int], status_fd: int) -> int:
    """Steps 1-2: create the namespaces and the init, tell the host its pid, leave."""
    enter_namespaces(cfg)
    init = clone_init()
    if init == 0:
        run_init(cfg, fds, status_fd)
    sys.stdout.write(f"{init}\n")
    sys.stdout.flush()
    return 0


def run_plain(cfg: dict, fds: dict[str, int], status_fd: int) -> int:
    """No namespaces: run in the host work directory; clean up as in the module docstring."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        status = supervise(cfg, fds, cfg["workdir"], in_namespace=False)
    except BaseException as exc:  # noqa: BLE001
        status = {"error": f"{type(exc).__name__}: {exc}"}
    write_status(status_fd, status)
    return 0


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        cfg = json.load(f)
    if cfg.get("seccomp"):
        # Import now: after the chroot the module's directory is no longer visible.
        sys.path.insert(0, cfg["seccomp"]["module_dir"])
        importlib.import_module("pyseccomp")
    fds = open_fds(cfg)
    status_fd = os.open(cfg["status_path"], os.O_WRONLY | os.O_TRUNC)
    if cfg["mode"] in ("namespaces", "userns"):
        return run_namespaced(cfg, fds, status_fd)
    return run_plain(cfg, fds, status_fd)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except OSError as exc:  # set-up refused before the status file is in play: one line for the host
        sys.stderr.write(f"keel-jail: {exc}\n")
        sys.exit(1)
