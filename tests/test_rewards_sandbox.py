"""The sandbox against hostile programs, plus known-answer checks of its limits, for every kind of host.

Every adversarial test runs the program through the `code_tests` reward with one test whose
expected output is exactly what the program prints if the attack worked, so a successful attack
would score 1. Each must end with a 0 reward, a reason, and the host unharmed (checked per test,
and after every test by `no_run_process_survives`: no process, zombie included, of a run left).

Each test runs under some of these runners, i.e. whoever calls the reward:
- "root": keel as root, the sandbox in "namespaces" mode (CI runs as root);
- "user": keel as an unprivileged user, the sandbox in its automatic mode, which must be
  "userns". As root the tests create a user (useradd) and run the reward in a fresh process as
  that user, the way a deployment on a shared cluster would; as a user they run it in-process;
- "weak": root with the weak plain mode (allow_weak), where that mode claims to hold;
- "weak-user": the weak plain mode as the unprivileged user, for the clean-up it claims;
- "root-userns": root in "userns" mode (root's fallback where it may not create namespaces
  itself), which must run the program as a random unprivileged host uid, not as root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

import rewards
from rewards.code import code_tests_reward
from rewards.evaluation import ScoringJob, evaluate_job
from rewards.process_pool import run_jobs_in_processes
from rewards.registry import RewardResult
from rewards.sandbox import (
    ALLOW_WEAK_ENV,
    FALLBACK_INTERPRETER,
    SANDBOX_UID_RANGE,
    SandboxLimits,
    SandboxUnavailable,
    is_world_executable,
    isolation_problem,
    resolve_isolation,
    run_in_sandbox,
    seccomp_module_dir,
)

TEST_USER = "keel-sandbox-test"
IS_ROOT = os.geteuid() == 0
HOST_TMP = "/tmp"

# The user's scoring process: given a request on stdin, calls the reward or the sandbox, prints JSON.
USER_DRIVER = r"""
import dataclasses, json, sys
sys.path[:0] = json.loads(sys.argv[1])
from rewards.code import code_tests_reward
from rewards.sandbox import SandboxLimits, available_isolation, run_in_sandbox
request = json.load(sys.stdin)
kwargs = request["kwargs"]
if request["call"] == "reward":
    result = code_tests_reward(**kwargs)
    out = {"score": result.score, "reason": result.reason}
elif request["call"] == "sandbox":
    kwargs["limits"] = SandboxLimits(**kwargs["limits"])
    out = dataclasses.asdict(run_in_sandbox(**kwargs))
else:
    out = {"isolation": available_isolation()}
json.dump(out, sys.stdout)
"""


# ---- the unprivileged user ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SandboxUser:
    uid: int
    gid: int
    python: str  # an interpreter that user can execute
    paths: list[str]  # sys.path entries holding a copy of `rewards` (and pyseccomp) it can read
    tmpdir: str  # its TMPDIR


def user_python() -> str | None:
    """This interpreter when any uid can run it, else the system Python (root's may be private)."""
    for candidate in (sys.executable, FALLBACK_INTERPRETER):
        if os.path.exists(candidate) and is_world_executable(candidate):
            return candidate
    return None


def readable_copy_of_rewards() -> list[str]:
    """A copy of `rewards` (and pyseccomp) any uid can read: the checkout may sit in root's home."""
    tree = tempfile.mkdtemp(prefix="keel-sandbox-test-tree-")
    os.chmod(tree, 0o755)
    shutil.copytree(os.path.dirname(rewards.__file__), os.path.join(tree, "rewards"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    seccomp_dir = seccomp_module_dir()
    site = os.path.join(tree, "site")
    os.mkdir(site)
    if seccomp_dir is not None:
        for name in os.listdir(seccomp_dir):
            if name.startswith("pyseccomp"):
                source = os.path.join(seccomp_dir, name)
                (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, os.path.join(site, name))
    for directory, _, files in os.walk(tree):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return [tree, site]


@pytest.fixture(scope="session")
def sandbox_user(run_marker: str) -> Iterator[SandboxUser | None]:
    """As root: TEST_USER (created if absent) with an interpreter and the code it can use; else None."""
    if not IS_ROOT:
        yield None
        return
    python = user_python()
    if python is None:
        pytest.skip("no interpreter an unprivileged user can execute")
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(TEST_USER)
    paths = readable_copy_of_rewards()
    # The user's runs work under the run marker too (see run_marker).
    tmpdir = os.path.join(run_marker, "user")
    os.mkdir(tmpdir)
    os.chown(tmpdir, entry.pw_uid, entry.pw_gid)
    yield SandboxUser(entry.pw_uid, entry.pw_gid, python, paths, tmpdir)
    shutil.rmtree(paths[0], ignore_errors=True)


def sandbox_user_uid() -> int | None:
    try:
        return pwd.getpwnam(TEST_USER).pw_uid if IS_ROOT else None
    except KeyError:
        return None


# ---- runners -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Runner:
    """Who calls the reward, and with which isolation."""

    name: str
    isolation: str | None
    allow_weak: bool
    user: SandboxUser | None  # run in a fresh process as this user; None: in this process

    def call(self, call: str, kwargs: dict, env: dict | None = None) -> dict:
        if self.user is None:
            with patched_environ(env or {}):
                if call == "reward":
                    result = code_tests_reward(**kwargs)
                    return {"score": result.score, "reason": result.reason}
                kwargs = dict(kwargs, limits=SandboxLimits(**kwargs["limits"]))
                return dataclasses.asdict(run_in_sandbox(**kwargs))
        process = subprocess.run(
            [self.user.python, "-I", "-c", USER_DRIVER, json.dumps(self.user.paths)],
            input=json.dumps({"call": call, "kwargs": kwargs}), capture_output=True, text=True, timeout=120,
            user=self.user.uid, group=self.user.gid, extra_groups=[], cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": self.user.tmpdir, **(env or {})})
        assert process.returncode == 0, f"the user's scoring process failed: {process.stderr[-2000:]}"
        return json.loads(process.stdout)

    def reward(self, program: str, output_if_it_worked: str, time_limit_s: float = 2.0,
               env: dict | None = None) -> RewardResult:
        kwargs = {"response": program, "sample": {"tests": [{"input": "", "output": output_if_it_worked}]},
                  "time_limit_s": time_limit_s, "isolation": self.isolation, "allow_weak": self.allow_weak}
        out = self.call("reward", kwargs, env)
        return RewardResult(out["score"], out["reason"])

    def sandbox(self, program: str, stdin: str = "", env: dict | None = None, **limits) -> dict:
        kwargs = {"code": program, "stdin": stdin, "limits": limits, "isolation": self.isolation,
                  "allow_weak": self.allow_weak}
        return self.call("sandbox", kwargs, env)

    def spawn(self, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        """A bystander process of the same host user as the scoring process."""
        ids = {"user": self.user.uid, "group": self.user.gid, "extra_groups": []} if self.user else {}
        return subprocess.Popen(argv, env=env, cwd="/", **ids)

    def host_dir(self) -> str:
        """A fresh host directory this runner's user owns, under a path every uid can traverse."""
        path = tempfile.mkdtemp(prefix="keel-sandbox-test-", dir=HOST_TMP)
        os.chmod(path, 0o755)
        if self.user:
            os.chown(path, self.user.uid, self.user.gid)
        return path

    def chown(self, path: str) -> None:
        if self.user:
            os.chown(path, self.user.uid, self.user.gid)


class patched_environ:
    """Set environment variables for the duration of a with block (a scoring process's secrets)."""

    def __init__(self, env: dict):
        self.env, self.saved = env, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def weak_usable() -> bool:
    root_needs_fallback = IS_ROOT and not os.path.exists(FALLBACK_INTERPRETER)
    return sys.platform.startswith("linux") and seccomp_module_dir() is not None and not root_needs_fallback


@pytest.fixture(scope="session")
def user_mode_checked(sandbox_user) -> None:
    """Skip the user runners where this kernel refuses unprivileged user namespaces."""
    if sandbox_user is None:
        problem = isolation_problem("userns")
    else:
        runner = Runner("user", None, False, sandbox_user)
        isolation = runner.call("isolation", {})["isolation"]
        problem = None if isolation == "userns" else f"the unprivileged user gets {isolation!r}"
    if problem:
        pytest.skip(f"unprivileged user namespaces unavailable: {problem}")


@pytest.fixture
def runner(request, sandbox_user) -> Runner:
    name = request.param
    if name == "root":
        if not IS_ROOT or isolation_problem("namespaces"):
            pytest.skip("namespaces mode needs root and Linux namespaces")
        return Runner(name, "namespaces", False, None)
    if name == "root-userns":
        if not IS_ROOT or isolation_problem("userns"):
            pytest.skip("needs root and user namespaces")
        return Runner(name, "userns", False, None)
    if name in ("weak", "weak-user"):
        if not weak_usable():
            pytest.skip("plain mode needs Linux and pyseccomp")
        if not IS_ROOT:  # as a user, weak mode would run hostile programs as the developer
            pytest.skip("the weak-mode tests run as root (weak-user drops to a test user)")
    if name in ("user", "weak-user"):
        request.getfixturevalue("user_mode_checked")
    isolation, allow_weak = ("plain", True) if name.startswith("weak") else (None, False)
    return Runner(name, isolation, allow_weak, None if name == "weak" else sandbox_user)


def runners(*names: str):
    return pytest.mark.parametrize("runner", names, indirect=True)


STRONG = runners("root", "user")
EVERYWHERE = runners("root", "user", "weak")


# ---- nothing of a run outlives it --------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def run_marker() -> Iterator[str]:
    """A temp directory every run of this session works under: the launcher's command line (which
    the init keeps) and the plain-mode program's cwd name it, so the leftover check can tell this
    session's runs from sandboxes other jobs on the machine run meanwhile."""
    marker = tempfile.mkdtemp(prefix="keel-sandbox-tests-")
    os.chmod(marker, 0o755)
    saved, tempfile.tempdir = tempfile.tempdir, marker
    yield marker
    tempfile.tempdir = saved
    shutil.rmtree(marker, ignore_errors=True)


def run_processes() -> dict[int, str]:
    """Host processes (zombies included) of this session's runs, pid -> summary: processes of a
    sandbox uid, of the test user or in a nested pid namespace that work under the run marker (a
    namespace's processes live only as long as its init, which does), and zombies of that kind
    orphaned to pid 1 or left to us. (Other jobs on the machine may run sandboxes meanwhile.)"""
    user_uid, marker, me = sandbox_user_uid(), tempfile.gettempdir(), os.getpid()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:  # a zombie has neither
            cmdline = cwd = ""
        uid, ppid = int(fields.get("Uid", "0").split()[0]), int(fields.get("PPid", "0"))
        zombie = fields.get("State", "").strip().startswith("Z")
        run_kind = (SANDBOX_UID_RANGE[0] <= uid < SANDBOX_UID_RANGE[1] or uid == user_uid
                    or len(fields.get("NSpid", "").split()) > 1)
        ours = run_kind and ((zombie and ppid in (1, me)) or marker in cmdline or marker in cwd)
        if ours:
            found[int(entry)] = f"uid {uid} parent {ppid} state {fields['State'].strip()} {fields['Name'].strip()}"
    return found


@pytest.fixture(autouse=True)
def no_run_process_survives():
    """After each test nothing of a run is left. A run reaps all it started before it returns, so
    a zombie is a failure even if the host's pid 1 reaps it a moment later."""
    before = set(run_processes())
    yield
    zombies: dict[int, str] = {}
    deadline = time.monotonic() + 3.0
    while True:
        left = {pid: what for pid, what in run_processes().items() if pid not in before}
        zombies.update({pid: what for pid, what in left.items() if "zombie" in what})
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert zombies == {}, "a run left zombies"
    assert left == {}, "processes of a run outlived it"


def assert_zero_with_reason(result: RewardResult, *words: str) -> None:
    assert result.score == 0.0
    assert result.reason
    for word in words:
        assert word in result.reason, result.reason


# ---- known-answer checks of the sandbox itself -------------------------------------------------

@runners("root", "user", "weak", "weak-user", "root-userns")
def test_runs_a_program_with_stdin_and_an_empty_environment(runner):
    result = runner.sandbox("import os\nprint(input()[::-1])\nprint(sorted(os.environ))", stdin="abc\n")
    assert result["exit_code"] == 0 and result["killed_reason"] is None
    assert result["stdout"] == "cba\n['HOME', 'LANG', 'PATH', 'TMPDIR']\n"
    assert result["isolation"] == {"root": "namespaces", "user": "userns", "root-userns": "userns"}.get(
        runner.name, "plain")


@runners("root", "user", "weak", "root-userns")
def test_process_limit_bounds_the_number_of_children(runner):
    # RLIMIT_NPROC binds only a uid that is not root's on the host, and counts per uid (per user
    # namespace and uid in userns), so this also shows each run has a uid of its own.
    program = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 200:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError:\n"
        "    pass\n"
        "print(n)\n"
    )
    result = runner.sandbox(program, wall_time_s=3, max_processes=8)
    assert result["exit_code"] == 0, result["stderr"]
    assert 0 < int(result["stdout"]) < 8


@STRONG
def test_namespace_modes_see_only_their_own_world(runner):
    program = "import os\nprint(sorted(os.listdir('/')), os.getuid() != 0, os.getcwd())"
    result = runner.sandbox(program)
    assert result["exit_code"] == 0, result["stderr"]
    assert "'etc', 'lib'" in result["stdout"] and "'sandbox'" in result["stdout"]
    for hidden in ("'home'", "'work'", "'proc'", "'sys'", "'var'"):
        assert hidden not in result["stdout"]
    assert result["stdout"].strip().endswith("True /sandbox")


def test_weak_mode_is_refused_unless_allowed(monkeypatch):
    # A host whose kernel refuses user namespaces: the automatic choice falls to plain mode.
    monkeypatch.delenv(ALLOW_WEAK_ENV, raising=False)
    monkeypatch.setattr("rewards.sandbox.available_isolation", lambda: "plain")
    monkeypatch.setattr("rewards.sandbox.isolation_problem", lambda mode: "user.max_user_namespaces is 0")
    monkeypatch.setattr("rewards.sandbox.userns_hints", lambda: "user.max_user_namespaces is 0")
    with pytest.raises(SandboxUnavailable, match="max_user_namespaces is 0.*allow_weak=True / KEEL_SANDBOX"):
        run_in_sandbox("print(1)")
    with pytest.raises(SandboxUnavailable, match="isolation='plain' is weak"):
        resolve_isolation("plain")
    # Scoring turns the reward's refusal into 0 with the reason.
    result = evaluate_job(ScoringJob(code_tests_reward, "print(1)", {"tests": [{"input": "", "output": "1"}]}))
    assert result.score == 0.0 and "SandboxUnavailable" in result.reason and "allow_weak" in result.reason
    assert resolve_isolation(allow_weak=True) == "plain"
    monkeypatch.setenv(ALLOW_WEAK_ENV, "1")
    assert resolve_isolation() == "plain"


REFUSAL_DRIVER = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from rewards.evaluation import ScoringJob, evaluate_job
from rewards.code import code_tests_reward
sample = {"tests": [{"input": "", "output": "1"}]}
refused = evaluate_job(ScoringJob(code_tests_reward, "print(1)", sample))
weak = code_tests_reward("print(1)", sample, allow_weak=True)
json.dump({"refused": refused.reason, "weak_score": weak.score}, sys.stdout)
"""


@pytest.mark.skipif(not IS_ROOT or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_a_kernel_that_refuses_user_namespaces_gets_a_refusal_saying_why(sandbox_user):
    # A real refusal: inside a user namespace whose user.max_user_namespaces is 0, the kernel
    # refuses the next one (and its root has no spare uid for namespaces mode either).
    shell = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -I -c "$1" "$2"'
    process = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", shell, sandbox_user.python, REFUSAL_DRIVER,
         json.dumps(sandbox_user.paths)],
        capture_output=True, text=True, timeout=60, user=sandbox_user.uid, group=sandbox_user.gid,
        extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin", "TMPDIR": sandbox_user.tmpdir})
    assert process.returncode == 0, process.stderr[-2000:]
    out = json.loads(process.stdout)
    assert "SandboxUnavailable" in out["refused"]
    for what in ("user.max_user_namespaces is 0", "run keel as root", "allow_weak=True", f"{ALLOW_WEAK_ENV}=1"):
        assert what in out["refused"]
    assert out["weak_score"] == 1.0  # allowed, the weak mode runs


def test_plain_mode_refuses_without_seccomp():
    if seccomp_module_dir() is not None:
        pytest.skip("pyseccomp is installed")
    with pytest.raises(SandboxUnavailable, match="pyseccomp"):
        run_in_sandbox("print(1)", isolation="plain", allow_weak=True)


@pytest.mark.skipif(seccomp_module_dir() is None, reason="pyseccomp is not installed")
@runners("root", "user", "weak")
def test_seccomp_refuses_sockets_but_unix_ones(runner):
    program = (
        "import errno, socket\n"
        "for family in (socket.AF_INET, socket.AF_INET6, 40, 38, socket.AF_UNIX):  # 40 vsock, 38 AF_ALG\n"
        "    try:\n"
        "        socket.socket(family, socket.SOCK_STREAM if family != 38 else socket.SOCK_SEQPACKET).close()\n"
        "        print('ok', end=' ')\n"
        "    except OSError as e:\n"
        "        print(errno.errorcode[e.errno], end=' ')\n"
    )
    result = runner.sandbox(program)
    # Plain mode has no network namespace, so it refuses Unix sockets too (host ones are reachable).
    unix = "EPERM" if runner.isolation == "plain" else "ok"
    assert result["stdout"].split() == ["EPERM"] * 4 + [unix]


# ---- adversarial programs -----------------------------------------------------------------------

@EVERYWHERE
def test_infinite_loop(runner):
    result = runner.reward("while True:\n    pass\n", "done", time_limit_s=1.0)
    assert_zero_with_reason(result, "time limit exceeded")


@EVERYWHERE
def test_fork_bomb(runner):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = runner.reward(program, "done", time_limit_s=1.5)
    assert_zero_with_reason(result, "time limit exceeded")
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still start processes


@runners("root", "user", "weak", "weak-user")
def test_setsid_fork_bomb(runner):
    # Every child leaves the session and process group first: a process-group kill misses them all.
    program = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = runner.reward(program, "done", time_limit_s=1.5)
    assert_zero_with_reason(result, "time limit exceeded")
    assert subprocess.run(["true"], timeout=10).returncode == 0


@EVERYWHERE
def test_memory_bomb(runner):
    program = "hog = []\nwhile True:\n    hog.append(bytearray(5 * 10**7))\n"
    assert_zero_with_reason(runner.reward(program, "done", time_limit_s=3.0), "memory limit exceeded")


@EVERYWHERE
def test_huge_file(runner):
    program = (
        "with open('big', 'wb') as f:\n"
        "    for _ in range(1000):\n"
        "        f.write(b'x' * 10**6)\n"
        "print('done')"
    )
    assert_zero_with_reason(runner.reward(program, "done"), "file size limit exceeded")


@EVERYWHERE
def test_stdout_flood(runner):
    program = "while True:\n    print('x' * 1000)\n"
    assert_zero_with_reason(runner.reward(program, "x"), "file size limit exceeded")


@STRONG
def test_dev_shm_flood(runner):
    # RLIMIT_FSIZE caps each file; only the work tmpfs's size caps their total, wherever they go.
    token = secrets.token_hex(4)
    program = (
        "for i in range(8):\n"
        f"    with open(f'/dev/shm/keel-flood-{token}-{{i}}', 'wb') as f:\n"
        "        f.write(b'x' * 15 * 2**20)\n"
        "print('flooded')"
    )
    assert_zero_with_reason(runner.reward(program, "flooded", time_limit_s=5.0), "work directory full")
    for directory in ("/dev/shm", HOST_TMP):
        assert not [name for name in os.listdir(directory) if token in name]


@STRONG
def test_read_etc_passwd(runner):
    with open("/etc/passwd") as f:
        first_line = f.readline().strip()
    result = runner.reward("print(open('/etc/passwd').readline().strip())", first_line)
    assert_zero_with_reason(result, "FileNotFoundError")


@STRONG
def test_read_the_run_directory(runner):
    run_dir = runner.host_dir()
    try:
        secret = os.path.join(run_dir, "checkpoint_secret.txt")
        with open(secret, "w") as f:
            f.write("s3cret-run-data")
        os.chmod(secret, 0o644)
        program = f"print(open({secret!r}).read() + open({os.path.abspath(__file__)!r}).read()[:0])"
        assert_zero_with_reason(runner.reward(program, "s3cret-run-data"), "FileNotFoundError")
    finally:
        shutil.rmtree(run_dir)


@STRONG
def test_files_of_the_invoking_user_directly_and_through_a_symlink(runner):
    # The invoking user's own private file: in the sandbox the program is that user on the host
    # (userns) or root's random uid, so only not seeing the file protects it.
    home = runner.host_dir()
    try:
        secret = os.path.join(home, "api_key")
        with open(secret, "w") as f:
            f.write("sk-user-secret")
        os.chmod(secret, 0o600)
        runner.chown(secret)
        program = (
            "import os\n"
            "worked = []\n"
            f"os.symlink({secret!r}, 'key_link')\n"
            "os.symlink('/etc/passwd', 'passwd_link')\n"
            "attempts = [('read', lambda: open(" + repr(secret) + ").read()),\n"
            "            ('symlink', lambda: open('key_link').read()),\n"
            "            ('passwd', lambda: open('passwd_link').read()),\n"
            "            ('chmod', lambda: os.chmod(" + repr(secret) + ", 0o666)),\n"
            "            ('delete', lambda: os.remove(" + repr(secret) + "))]\n"
            "for name, attempt in attempts:\n"
            "    try:\n"
            "        attempt()\n"
            "        worked.append(name)\n"
            "    except OSError:\n"
            "        pass\n"
            "print(' '.join(worked) or 'nothing')\n"
        )
        assert_zero_with_reason(runner.reward(program, "read symlink passwd chmod delete"), "wrong answer")
        assert runner.sandbox(program)["stdout"] == "nothing\n"
        with open(secret) as f:
            assert f.read() == "sk-user-secret"
        assert os.stat(secret).st_mode & 0o777 == 0o600
    finally:
        shutil.rmtree(home)


@STRONG
def test_delete_files_outside_its_directory(runner):
    top = runner.host_dir()
    try:
        victim_dir = os.path.join(top, "world_writable")
        os.mkdir(victim_dir)
        victim = os.path.join(victim_dir, "precious.txt")
        with open(victim, "w") as f:
            f.write("keep me")
        os.chmod(top, 0o777)
        os.chmod(victim_dir, 0o777)
        program = (
            f"import os, shutil\n"
            f"os.remove({victim!r})\n"
            f"shutil.rmtree({victim_dir!r})\n"
            f"print('deleted')"
        )
        assert_zero_with_reason(runner.reward(program, "deleted"), "runtime error")
        with open(victim) as f:
            assert f.read() == "keep me"
    finally:
        shutil.rmtree(top)


@STRONG
def test_write_into_system_directories(runner):
    program = (
        "for p in ('/usr/keel_pwned', '/etc/keel_pwned', '/keel_pwned'):\n"
        "    open(p, 'w').write('x')\n"
        "print('written')"
    )
    assert_zero_with_reason(runner.reward(program, "written"), "Read-only file system")
    assert not any(os.path.exists(p) for p in ("/usr/keel_pwned", "/etc/keel_pwned", "/keel_pwned"))


@EVERYWHERE
def test_socket_to_localhost(runner):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    program = (
        f"import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        f"s.sendall(b'hi')\n"
        f"print('connected')"
    )
    try:
        result = runner.reward(program, "connected")
        # A connection would sit completed in the backlog by now.
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert_zero_with_reason(result, "runtime error")


@EVERYWHERE
def test_io_uring_socket(runner):
    # IORING_OP_SOCKET opens a socket without the socket() syscall the filter inspects. Without
    # the filter, io_uring_setup fails only by accident (RLIMIT_MEMLOCK 0 gives ENOMEM).
    result = runner.reward(IO_URING_SOCKET, "socket opened")
    assert_zero_with_reason(result, "wrong answer")
    assert runner.sandbox(IO_URING_SOCKET)["stdout"] == "io_uring_setup refused: EPERM\n"


IO_URING_SOCKET = """
import ctypes, errno, mmap, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 4, params)  # io_uring_setup(entries, params)
if fd < 0:
    print("io_uring_setup refused:", errno.errorcode[ctypes.get_errno()])
    raise SystemExit
sq_entries, cq_entries = struct.unpack_from("II", params, 0)
sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("7I", params, 40)
cq_head, _, cq_mask, _, _, cqes = struct.unpack_from("6I", params, 80)
sq = mmap.mmap(fd, sq_array + sq_entries * 4, offset=0)
cq = mmap.mmap(fd, cqes + cq_entries * 16, offset=0x8000000)
sqes = mmap.mmap(fd, sq_entries * 64, offset=0x10000000)
sqes[0:64] = struct.pack("BBHiQ", 45, 0, 0, 2, 1).ljust(64, b"\\0")  # IORING_OP_SOCKET(AF_INET, SOCK_STREAM)
tail = struct.unpack_from("I", sq, sq_tail)[0]
struct.pack_into("I", sq, sq_array + (tail & struct.unpack_from("I", sq, sq_mask)[0]) * 4, 0)
struct.pack_into("I", sq, sq_tail, tail + 1)
libc.syscall(426, fd, 1, 1, 1, None, 0)  # io_uring_enter(fd, submit 1, wait for 1, GETEVENTS)
head = struct.unpack_from("I", cq, cq_head)[0]
res = struct.unpack_from("i", cq, cqes + (head & struct.unpack_from("I", cq, cq_mask)[0]) * 16 + 8)[0]
print("socket opened" if res >= 0 else "IORING_OP_SOCKET failed")
"""


@EVERYWHERE
def test_environment_secrets(runner):
    program = "import os\nprint(os.environ.get('KEEL_TEST_API_KEY', 'absent'))"
    result = runner.reward(program, "sk-very-secret", env={"KEEL_TEST_API_KEY": "sk-very-secret"})
    assert_zero_with_reason(result, "wrong answer")


@EVERYWHERE
def test_another_process_environment(runner):
    # A process of the same host user as the scoring process (the trainer, say) holding a secret.
    token = f"sk-{secrets.token_hex(8)}"
    bystander = runner.spawn(["sleep", "30"], env={"KEEL_BYSTANDER_SECRET": token})
    try:
        program = (
            f"env = open('/proc/{bystander.pid}/environ').read()\n"
            "print(env.split('KEEL_BYSTANDER_SECRET=')[1].split(chr(0))[0])"
        )
        assert_zero_with_reason(runner.reward(program, token), "runtime error")
    finally:
        bystander.kill()
        bystander.wait()


@EVERYWHERE
def test_daemon_that_outlives_the_run(runner):
    program = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30)\n"
        "        print('daemon survived', flush=True)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    )
    assert_zero_with_reason(runner.reward(program, "daemon survived"), "wrong answer")
    # no_run_process_survives checks the daemon is gone once the run has returned.


@runners("root", "user", "weak", "weak-user")
def test_setsid_daemon_writing_to_host_tmp(runner):
    # A double-forked, signal-ignoring daemon that keeps appending to a file in /tmp.
    path = os.path.join(HOST_TMP, f"keel-daemon-{secrets.token_hex(4)}")
    program = (
        "import os, signal, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
        "            signal.signal(s, signal.SIG_IGN)\n"
        "        while True:\n"
        f"            with open({path!r}, 'a') as f:\n"
        "                f.write('x')\n"
        "            time.sleep(0.02)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "time.sleep(0.2)\n"
        f"print(os.path.getsize({path!r}) > 0)\n"
    )
    try:
        result = runner.reward(program, "daemon running after the run", time_limit_s=2.0)
        assert_zero_with_reason(result, "wrong answer")
        if runner.isolation != "plain":
            assert not os.path.exists(path)  # /tmp is the run's own tmpfs
        else:  # plain mode writes to the host's /tmp, but not after the run
            size = os.path.getsize(path)
            time.sleep(0.2)
            assert os.path.getsize(path) == size
    finally:
        if os.path.exists(path):
            os.remove(path)


@runners("root", "user", "weak", "root-userns")
def test_kill_every_process_it_can(runner):
    # Bystanders of the scoring process's own host user: what kill(-1) hit in the old plain mode.
    bystander = runner.spawn(["sleep", "30"])
    try:
        program = (
            "import os, signal\n"
            "for pid in (-1, 1, os.getppid()):\n"
            "    os.kill(pid, signal.SIGKILL)\n"
            "print('killed')"
        )
        result = runner.reward(program, "killed")  # the scoring process survived to answer
        assert result.score == 0.0 and result.reason
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def launcher_pids(runner: Runner) -> list[int]:
    """The jail processes of this test's runs: our children, or the test user's."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if b"jail.py" not in cmdline or fields["State"].strip().startswith("Z"):
            continue
        if (int(fields["Uid"].split()[0]) == runner.user.uid) if runner.user else (
                int(fields["PPid"]) == os.getpid()):
            pids.append(int(entry))
    return pids


@STRONG
def test_killing_the_launcher(runner):
    # Whoever kills the launcher (the OOM killer, an operator), the run scores 0 with a reason
    # at once, and nothing of it survives (no_run_process_survives), zombies included.
    def kill_the_launcher():
        deadline = time.monotonic() + 20
        while not launcher_pids(runner) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the program is running by now
        for pid in launcher_pids(runner):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_launcher)
    killer.start()
    start = time.monotonic()
    program = "import time\nprint('started', flush=True)\ntime.sleep(30)\nprint('survived')"
    result = runner.reward(program, "started\nsurvived", time_limit_s=30.0)
    killer.join()
    assert_zero_with_reason(result, "sandbox launcher killed by SIGKILL")
    assert time.monotonic() - start < 10


@EVERYWHERE
def test_escape_through_a_new_user_namespace(runner):
    # The seccomp filter refuses unshare(); without it the kernel still refuses a chrooted process.
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.unshare(0x10000000) == 0\n"
        "print('escaped')"
    )
    assert_zero_with_reason(runner.reward(program, "escaped"), "AssertionError")


@pytest.mark.skipif(not (IS_ROOT or isolation_problem("userns") is None), reason="needs a namespace mode")
def test_a_scoring_worker_killed_at_its_deadline_leaves_nothing_of_its_run(monkeypatch, run_marker):
    # The local pool stops a worker whose job passed its deadline; the sandboxed run the worker was
    # waiting for must end with it, reaped (no_run_process_survives), not a zombie of pid 1.
    monkeypatch.setenv("TMPDIR", run_marker)  # the spawned worker's runs carry the marker too
    job = ScoringJob(code_tests_reward, "import time\ntime.sleep(30)", {"tests": [{"input": "", "output": ""}]},
                     {"time_limit_s": 30.0})
    [result] = run_jobs_in_processes([job], timeout_s=1.5, max_concurrency=1)
    assert result.score == 0.0 and "timeout" in result.reason
