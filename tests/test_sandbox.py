"""Hostile programs stay contained by run_sandboxed, and the caller is unaffected."""
import errno
import os
import resource
import socket
import subprocess
import sys
import time
import uuid

import pytest

from deepseek_jax.rl import sandbox

IS_ROOT = os.geteuid() == 0
RLIMITS = [getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")]


def _require(mode: str) -> None:
    if mode == "namespaces" and sandbox.isolation_mode() != "namespaces":
        pytest.skip("namespaces (unshare) are not available on this machine")


@pytest.fixture(autouse=True)
def caller_unaffected():
    """Every test: the limits, identity and cwd of this (the trainer's) process survive."""
    def state():
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        return {r: resource.getrlimit(r) for r in RLIMITS}, os.getresuid(), os.getcwd(), env

    before = state()
    yield
    assert state() == before
    assert _descendants(os.getpid()) == []


def _descendants(root: int) -> list[int]:
    """Pids of all processes below `root` (threads excluded)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError):
                pass
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def _tagged(code: str) -> tuple[str, str]:
    """Prefixes `code` with a rename of its process to a unique tag, which forks inherit.

    Checks for survivors then look for that tag machine-wide, so they see this test's
    processes only, not those of sandbox runs in other test workers.
    """
    tag = "dsj" + uuid.uuid4().hex[:12]
    return tag, f"open('/proc/self/comm', 'w').write({tag!r})\n" + code


def _processes_named(tag: str) -> list[int]:
    """Pids of processes, anywhere on the machine, whose name is `tag`."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == tag:
                        pids.append(int(name))
            except OSError:
                continue
    return pids


def test_namespaces_are_used_where_the_os_allows_them():
    """Guards against a broken launcher silently degrading every run to 'plain'."""
    argv = ["unshare", "--mount", "--net", "--pid", "--ipc", "--fork", "true"]
    if not IS_ROOT:
        argv[1:1] = ["--user", "--map-root-user"]
    try:
        allowed = subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except FileNotFoundError:
        allowed = False
    if not allowed:
        pytest.skip("this OS does not let us create the namespaces")
    assert sandbox.isolation_mode() == "namespaces"


@pytest.mark.parametrize("mode", ["namespaces", "plain"])
def test_runs_code_with_stdin_and_exit_status(mode):
    _require(mode)
    r = sandbox.run_sandboxed("import sys\nprint(input()[::-1])\nprint('err', file=sys.stderr)",
                              stdin="olleh", isolation=mode)
    assert (r.ok, r.returncode, r.stdout, r.stderr, r.timed_out, r.killed_reason) == (
        True, 0, "hello\n", "err\n", False, None)
    r = sandbox.run_sandboxed("raise SystemExit(3)", isolation=mode)
    assert (r.ok, r.returncode, r.killed_reason) == (False, 3, None)


def test_identity_inside_namespaces():
    _require("namespaces")
    code = "import os\nprint(os.getpid(), os.getuid(), os.getcwd(), len(os.listdir('/proc')))"
    pid, uid, cwd, _ = sandbox.run_sandboxed(code).stdout.split()
    assert pid == "2"  # PID 1 is the launcher: a fresh PID namespace
    assert cwd == "/tmp"
    if IS_ROOT:
        assert int(uid) in sandbox.SANDBOX_UID_RANGE


def test_infinite_loop_hits_wall_timeout():
    start = time.monotonic()
    r = sandbox.run_sandboxed("while True:\n    pass", timeout_s=1, cpu_s=10)
    elapsed = time.monotonic() - start
    assert (r.ok, r.timed_out, r.killed_reason) == (False, True, "wall_timeout")
    assert elapsed < 2.0, elapsed


def test_cpu_limit():
    start = time.monotonic()
    r = sandbox.run_sandboxed("while True:\n    pass", timeout_s=10, cpu_s=1)
    assert (r.ok, r.timed_out, r.killed_reason) == (False, False, "cpu_time")
    assert time.monotonic() - start < 3.0


def test_fork_bomb_is_contained():
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n")
    tag, bomb = _tagged(bomb)
    start = time.monotonic()
    r = sandbox.run_sandboxed(bomb, timeout_s=1, cpu_s=1, max_procs=8)
    assert time.monotonic() - start < 2.5
    assert not r.ok and r.killed_reason in ("wall_timeout", "cpu_time")
    assert _descendants(os.getpid()) == []
    assert _processes_named(tag) == []
    # The machine can still start processes.
    assert subprocess.run([sys.executable, "-c", "print(7)"], capture_output=True,
                          text=True, timeout=30).stdout == "7\n"


@pytest.mark.skipif(not IS_ROOT, reason="without root the count includes all of the "
                    "caller's processes (plain) or the launcher (user namespace)")
def test_process_limit():
    """max_procs=5 as a fresh uid: main.py plus exactly 4 children, then EAGAIN."""
    code = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except BlockingIOError:\n        break\n    if pid == 0:\n"
            "        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n)\n")
    r = sandbox.run_sandboxed(code, max_procs=5)
    assert r.ok and r.stdout == "4\n"


@pytest.mark.parametrize("mode", ["namespaces", "plain"])
def test_escaped_daemon_is_killed(mode):
    """A double-forked, setsid'd child that outlives main.py does not survive the run."""
    _require(mode)
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(60)\n"
            "    os._exit(0)\n"
            "os.wait()\n"
            "print('parent done')\n")
    tag, code = _tagged(code)
    r = sandbox.run_sandboxed(code, timeout_s=5, isolation=mode)
    assert r.ok and r.stdout == "parent done\n"
    assert _descendants(os.getpid()) == []
    assert _processes_named(tag) == []


def test_huge_allocation_hits_memory_limit():
    r = sandbox.run_sandboxed("x = bytearray(8 << 30)\nprint('allocated')", memory_mb=256)
    assert (r.ok, r.returncode, r.stdout, r.killed_reason) == (False, 1, "", "memory")
    assert r.stderr.rstrip().endswith("MemoryError")


def test_huge_file_write_hits_file_size_limit():
    r = sandbox.run_sandboxed("open('big', 'wb').write(b'x' * (5 << 20))", file_size_mb=1)
    assert (r.ok, r.killed_reason) == (False, "file_size")
    code = ("import os\ntry:\n    open('big', 'wb').write(b'x' * (5 << 20))\n"
            "except OSError as e:\n    print(e.errno, os.path.getsize('big'))\n")
    assert sandbox.run_sandboxed(code, file_size_mb=1).stdout == f"{errno.EFBIG} {1 << 20}\n"


def test_workspace_size_is_bounded():
    _require("namespaces")
    code = ("import os\nfor i in range(20):\n    try:\n"
            "        open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n"
            "    except OSError as e:\n        print(i, e.errno)\n        break\n")
    r = sandbox.run_sandboxed(code, file_size_mb=1, disk_mb=4)
    # 4 MiB of tmpfs less main.py's page holds 3 whole 1 MiB files; tmpfs's per-CPU block
    # accounting may let a 4th through, never a 5th.
    assert r.stdout in (f"3 {errno.ENOSPC}\n", f"4 {errno.ENOSPC}\n")


@pytest.mark.parametrize("mode", ["namespaces", "plain"])
def test_writes_outside_the_sandbox_dir_do_not_land(mode, tmp_path):
    _require(mode)
    if mode == "plain" and not IS_ROOT:
        pytest.skip("plain mode without root cannot drop privileges, so it cannot protect "
                    "files the caller owns")
    tag = uuid.uuid4().hex
    targets = [str(tmp_path / "outside.txt"), f"/var/tmp/dsj_{tag}", f"/dev/shm/dsj_{tag}",
               f"/tmp/dsj_{tag}", os.path.join(os.path.dirname(sandbox.__file__), f"x_{tag}")]
    if mode == "plain":
        # World-writable directories stay writable without a mount namespace (documented).
        targets = [targets[0], targets[-1]]
    code = ("import sys\nfor path in sys.stdin.read().split():\n    try:\n"
            "        open(path, 'w').write('pwned')\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
            "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n")
    r = sandbox.run_sandboxed(code, stdin="\n".join(targets), isolation=mode)
    assert r.ok, r.stderr
    assert r.stdout.splitlines()[-1] == "ok"  # the sandbox's own directory is writable
    for path in targets:
        assert not os.path.exists(path), path
    assert os.listdir(tmp_path) == []


def test_no_network():
    if sandbox.isolation_mode() != "namespaces":
        pytest.skip("no network namespace here (unshare unavailable), so the sandbox "
                    "cannot block connections to 127.0.0.1")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = ("import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "    print('connected')\nexcept OSError as e:\n    print(e.errno)\n")
        r = sandbox.run_sandboxed(code)
        assert r.stdout == f"{errno.ENETUNREACH}\n"
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached us


def test_cannot_regain_privileges_or_forge_the_report():
    _require("namespaces")
    code = ("import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n"
            "try:\n    os.setuid(0 if os.getuid() else 1)\n"
            "except OSError:\n    print('setuid denied')\n"
            "fake = b'{\"exit\": 0, \"signal\": null, \"timed_out\": false}'\n"
            "for fd in range(3, 128):\n    try:\n        os.write(fd, fake)\n"
            "    except OSError:\n        pass\n"
            "raise SystemExit(5)\n")
    r = sandbox.run_sandboxed(code)
    assert r.stdout == f"-1 {errno.EPERM}\nsetuid denied\n"
    assert (r.ok, r.returncode) == (False, 5)


def test_output_is_capped():
    code = "import sys\nsys.stdout.write('x' * (4 << 20))\nsys.stderr.write('y' * (4 << 20))"
    r = sandbox.run_sandboxed(code, max_output_bytes=1000)
    assert r.ok and r.truncated
    assert (r.stdout, r.stderr) == ("x" * 1000, "y" * 1000)


def test_rejects_bad_limits():
    with pytest.raises(ValueError, match="memory_mb"):
        sandbox.run_sandboxed("pass", memory_mb=0)
    with pytest.raises(ValueError, match="isolation"):
        sandbox.run_sandboxed("pass", isolation="docker")
