"""The sandbox against hostile programs, plus known-answer checks of its limits.

Every adversarial test runs the program through the `code_tests` reward with one test whose
expected output is exactly what the program prints if the attack worked, so a successful attack
would score 1. Each must end with a 0 reward, a reason, and the host unharmed (checked per test,
and after every test by `no_sandbox_process_survives`).
"""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from rewards.code import code_tests_reward
from rewards.sandbox import (
    FALLBACK_INTERPRETER,
    SANDBOX_UID_RANGE,
    SandboxLimits,
    SandboxUnavailable,
    available_isolation,
    run_in_sandbox,
    seccomp_module_dir,
)


def mode_usable(mode: str) -> bool:
    if mode == "namespaces":
        return available_isolation() == "namespaces"
    root_needs_fallback = os.geteuid() == 0 and not os.path.exists(FALLBACK_INTERPRETER)
    return sys.platform.startswith("linux") and seccomp_module_dir() is not None and not root_needs_fallback


MODES = [pytest.param(m, marks=pytest.mark.skipif(not mode_usable(m), reason=f"{m} isolation unavailable"))
         for m in ("namespaces", "plain")]
namespaces_only = pytest.mark.skipif(not mode_usable("namespaces"), reason="needs Linux namespaces (root)")


def sandbox_processes() -> list[int]:
    """Host pids running as a sandbox uid."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                uid_line = next(line for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if SANDBOX_UID_RANGE[0] <= int(uid_line.split()[1]) < SANDBOX_UID_RANGE[1]:
            pids.append(int(entry))
    return pids


@pytest.fixture(autouse=True)
def no_sandbox_process_survives():
    yield
    deadline = time.monotonic() + 2.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


def attack(program: str, output_if_it_worked: str, mode: str, time_limit_s: float = 2.0):
    sample = {"tests": [{"input": "", "output": output_if_it_worked}]}
    return code_tests_reward(program, sample, time_limit_s=time_limit_s, isolation=mode)


def assert_zero_with_reason(result, *words: str) -> None:
    assert result.score == 0.0
    assert result.reason
    for word in words:
        assert word in result.reason


# ---- known-answer checks of the sandbox itself -------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_runs_a_program_with_stdin_and_an_empty_environment(mode):
    result = run_in_sandbox("import os\nprint(input()[::-1])\nprint(sorted(os.environ))", stdin="abc\n",
                            isolation=mode)
    assert result.ok and result.isolation == mode
    assert result.stdout == "cba\n['HOME', 'LANG', 'PATH', 'TMPDIR']\n"


@pytest.mark.parametrize("mode", MODES)
def test_process_limit_bounds_the_number_of_children(mode):
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
    if os.geteuid() != 0:
        pytest.skip("RLIMIT_NPROC counts the invoking user's processes when not root")
    result = run_in_sandbox(program, limits=SandboxLimits(wall_time_s=3, max_processes=8), isolation=mode)
    assert result.ok
    assert 0 < int(result.stdout) < 8


@namespaces_only
def test_namespaces_mode_sees_only_its_own_world():
    program = "import os\nprint(sorted(os.listdir('/')), os.getuid() != 0, os.getcwd())"
    result = run_in_sandbox(program, isolation="namespaces")
    assert result.ok
    assert "'etc', 'lib'" in result.stdout and "'root'" in result.stdout  # /root only as the python prefix
    assert "'home'" not in result.stdout and "'work'" not in result.stdout and "'proc'" not in result.stdout
    assert result.stdout.strip().endswith("True /sandbox")


def test_plain_mode_refuses_without_seccomp(monkeypatch):
    if seccomp_module_dir() is not None:
        pytest.skip("pyseccomp is installed")
    with pytest.raises(SandboxUnavailable, match="pyseccomp"):
        run_in_sandbox("print(1)", isolation="plain")


# ---- adversarial programs -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop(mode):
    result = attack("while True:\n    pass\n", "done", mode, time_limit_s=1.0)
    assert_zero_with_reason(result, "time limit exceeded")


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = attack(program, "done", mode, time_limit_s=1.5)
    assert_zero_with_reason(result, "time limit exceeded")
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still start processes


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb(mode):
    program = "hog = []\nwhile True:\n    hog.append(bytearray(5 * 10**7))\n"
    assert_zero_with_reason(attack(program, "done", mode, time_limit_s=3.0), "memory limit exceeded")


@pytest.mark.parametrize("mode", MODES)
def test_huge_file(mode):
    program = (
        "with open('big', 'wb') as f:\n"
        "    for _ in range(1000):\n"
        "        f.write(b'x' * 10**6)\n"
        "print('done')"
    )
    assert_zero_with_reason(attack(program, "done", mode), "file size limit exceeded")


@pytest.mark.parametrize("mode", MODES)
def test_stdout_flood(mode):
    program = "while True:\n    print('x' * 1000)\n"
    assert_zero_with_reason(attack(program, "x", mode), "file size limit exceeded")


@namespaces_only
def test_read_etc_passwd():
    with open("/etc/passwd") as f:
        first_line = f.readline().strip()
    result = attack("print(open('/etc/passwd').readline().strip())", first_line, "namespaces")
    assert_zero_with_reason(result, "FileNotFoundError")


@namespaces_only
def test_read_the_run_directory(tmp_path):
    secret = tmp_path / "checkpoint_secret.txt"
    secret.write_text("s3cret-run-data")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    program = f"print(open({str(secret)!r}).read() + open({os.path.abspath(__file__)!r}).read()[:0])"
    result = attack(program, "s3cret-run-data", "namespaces")
    assert_zero_with_reason(result, "FileNotFoundError")


@namespaces_only
def test_delete_files_outside_its_directory(tmp_path):
    victim_dir = tmp_path / "world_writable"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o777)
    os.chmod(victim_dir, 0o777)
    program = (
        f"import os, shutil\n"
        f"os.remove({str(victim)!r})\n"
        f"shutil.rmtree({str(victim_dir)!r})\n"
        f"print('deleted')"
    )
    assert_zero_with_reason(attack(program, "deleted", "namespaces"), "runtime error")
    assert victim.read_text() == "keep me"


@namespaces_only
def test_write_into_system_directories():
    program = (
        "for p in ('/usr/keel_pwned', '/etc/keel_pwned', '/keel_pwned'):\n"
        "    open(p, 'w').write('x')\n"
        "print('written')"
    )
    assert_zero_with_reason(attack(program, "written", "namespaces"), "Read-only file system")
    assert not any(os.path.exists(p) for p in ("/usr/keel_pwned", "/etc/keel_pwned", "/keel_pwned"))


@pytest.mark.parametrize("mode", MODES)
def test_socket_to_localhost(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4.0)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept_or_none(server)))
    thread.start()
    program = (
        f"import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        f"s.sendall(b'hi')\n"
        f"print('connected')"
    )
    result = attack(program, "connected", mode)
    thread.join()
    server.close()
    assert_zero_with_reason(result, "runtime error")
    assert accepted == [None]


def _accept_or_none(server: socket.socket):
    try:
        return server.accept()
    except TimeoutError:
        return None


@pytest.mark.parametrize("mode", MODES)
def test_environment_secrets(mode, monkeypatch):
    monkeypatch.setenv("KEEL_TEST_API_KEY", "sk-very-secret")
    program = "import os\nprint(os.environ.get('KEEL_TEST_API_KEY', 'absent'))"
    result = attack(program, "sk-very-secret", mode)
    assert_zero_with_reason(result, "wrong answer")


@pytest.mark.parametrize("mode", MODES)
def test_daemon_that_outlives_the_run(mode):
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
    result = attack(program, "daemon survived", mode)
    assert_zero_with_reason(result, "wrong answer")
    # no_sandbox_process_survives checks the daemon is gone once the run has returned.


@pytest.mark.parametrize("mode", MODES)
def test_kill_every_process_it_can(mode):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        program = (
            "import os, signal\n"
            "for pid in (-1, 1, os.getppid()):\n"
            "    os.kill(pid, signal.SIGKILL)\n"
            "print('killed')"
        )
        result = attack(program, "killed", mode)
        assert result.score == 0.0 and result.reason
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("mode", MODES)
def test_escape_through_a_new_user_namespace(mode):
    # In namespaces mode the kernel refuses: a chrooted process may not create a user namespace;
    # in plain mode the seccomp filter refuses unshare().
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.unshare(0x10000000) == 0\n"
        "print('escaped')"
    )
    assert_zero_with_reason(attack(program, "escaped", mode), "AssertionError")


@pytest.mark.skipif(seccomp_module_dir() is None, reason="pyseccomp is not installed")
@pytest.mark.parametrize("mode", MODES)
def test_seccomp_refuses_network_sockets(mode):
    program = (
        "import errno, socket\n"
        "try:\n"
        "    socket.socket()\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])"
    )
    result = run_in_sandbox(program, isolation=mode)
    assert result.ok and result.stdout.strip() == "EPERM"
