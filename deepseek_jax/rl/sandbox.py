"""Run untrusted, model-generated Python in a separate, locked-down process.

`run_sandboxed(code)` never executes `code` in the calling (trainer) process. It starts

    unshare (namespaces)  ->  launcher (this file as a script)  ->  python -I -S main.py

The launcher is a small trusted program: it prepares the namespaces' filesystem, forks
the untrusted interpreter with resource limits and without privileges, enforces the
wall-clock timeout, kills every descendant at the end and reports the exit status on a
private pipe. Limits are set in the launcher rather than in a `preexec_fn` because
`preexec_fn` runs Python in a forked copy of a multi-threaded JAX process, which can
deadlock; the trainer only ever does a plain fork+exec.

Two isolation modes; `isolation_mode()` picks the strongest one that works here.

"namespaces" (root, or unprivileged user namespaces) -- guaranteed:
  * new PID namespace: the code sees only the launcher and its own processes, cannot
    signal anything else, and once the launcher (its PID 1) exits the kernel kills
    whatever is left;
  * new network namespace with only a down loopback: no TCP/UDP to anything, not even
    127.0.0.1 (abstract Unix sockets are per-namespace too);
  * new IPC namespace (System V IPC, POSIX message queues);
  * new mount namespace in which every mount is remounted read-only, `/tmp` is a
    fresh size-limited tmpfs (`disk_mb`) that is the working directory and vanishes
    with the namespace, and `/proc` is the new namespace's own. The code may create
    nested user/mount namespaces, but the kernel locks the inherited read-only flags
    there and anything it mounts is private to it;
  * no privileges: as real root the code runs as a fresh uid from `SANDBOX_UID_RANGE`
    (no groups, so RLIMIT_NPROC counts only this sandbox's processes); as an
    unprivileged user it is uid 0 of a user namespace with every capability gone
    (bounding set emptied, SECBIT_NOROOT locked), so it cannot undo the mounts;
  * no_new_privs, so setuid binaries grant nothing.
"plain" (no usable `unshare`) -- rlimits, the privilege drop when the caller is root,
  a subreaper launcher that kills the whole process tree, and the temporary directory
  as cwd. Not guaranteed there: network isolation; files written outside the sandbox
  directory (world-writable /tmp, /var/tmp, /dev/shm always, and everything the caller
  may write when it is not root); and, when not root, cleanup of processes that first
  kill the launcher (same uid) and then leave the session.

Both modes: RLIMIT_CPU/AS/FSIZE/NPROC/NOFILE, core dumps off, a wall-clock timeout,
stdout/stderr captured up to `max_output_bytes` each, a minimal environment, and an
isolated interpreter (`-I -S`: no site-packages, no PYTHON* variables), so only the
standard library is importable. Never guaranteed: confidentiality of world-readable
files (the code can read e.g. the repository), a bound on total memory across
processes (RLIMIT_AS is per process: at worst `max_procs * memory_mb`; a cgroup would
be needed), CPU fairness (each process gets `cpu_s`; the wall timeout bounds all),
and safety against kernel exploits (no seccomp filter, no VM).
As root the code runs under the system python3 when this interpreter lives somewhere
a sandbox uid cannot enter (e.g. pyenv under /root); see `default_python`.
"""
import dataclasses
import functools
import json
import logging
import math
import os
import random
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

# Fresh, unnamed uids for sandboxed code when we run as root: owning no files and
# sharing no process count with anything else on the machine.
SANDBOX_UID_RANGE = range(1_900_000_000, 1_910_000_000)

_GRACE_S = 5.0  # extra wall time for the launcher's setup/cleanup before the backstop
_NOFILE = 128
_KILL_PATIENCE_S = 2.0
_WORK_IN_NAMESPACE = "/tmp"

# Linux ABI constants (<sys/mount.h>, <linux/prctl.h>, <linux/securebits.h>).
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND = 32, 4096
_MOUNT_OPTION_FLAGS = {
    "nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "nosymfollow": 256,
    "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24,
}
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS = 24, 28, 38
_PR_SET_CHILD_SUBREAPER, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 36, 47, 4
_SECBIT_NOROOT, _SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ok: exited with status 0 within every limit. returncode: the exit status, or
    -signal when killed by a signal (subprocess's convention). killed_reason: None, or
    "wall_timeout", "cpu_time", "memory", "file_size", "signal:NAME". "memory" and
    "file_size" are read from the code's own traceback (MemoryError / EFBIG), so code
    can forge them; they are diagnostics, `ok` never depends on them. truncated: some
    output beyond `max_output_bytes` was discarded.
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    truncated: bool = False


class SandboxError(RuntimeError):
    """The sandbox itself could not run the code (not the code's fault)."""


def run_sandboxed(code: str, *, timeout_s: float = 5, cpu_s: int = 2, memory_mb: int = 256,
                  file_size_mb: int = 1, max_procs: int = 16, disk_mb: int = 16,
                  stdin: str | bytes | None = None, max_output_bytes: int = 1 << 16,
                  isolation: str | None = None, python: str | None = None) -> SandboxResult:
    """Runs `code` as `main.py` in a fresh process under the limits above.

    max_procs: RLIMIT_NPROC (processes plus threads). disk_mb: size of the working
    tmpfs (namespaces mode only). isolation: "namespaces" | "plain" | None (the
    strongest available). python: interpreter for the code; default: this one if an
    unprivileged uid can run it, else the system python3.
    """
    for name, value in (("timeout_s", timeout_s), ("cpu_s", cpu_s), ("memory_mb", memory_mb),
                        ("file_size_mb", file_size_mb), ("max_procs", max_procs),
                        ("disk_mb", disk_mb), ("max_output_bytes", max_output_bytes)):
        if value <= 0:
            raise ValueError(f"run_sandboxed: {name} must be positive, got {value!r}.")
    cpu_s = math.ceil(cpu_s)  # RLIMIT_CPU counts whole seconds
    mode = isolation or isolation_mode()
    if mode not in ("namespaces", "plain"):
        raise ValueError(f"isolation must be 'namespaces', 'plain' or None, got {mode!r}.")
    uid = random.SystemRandom().choice(SANDBOX_UID_RANGE) if os.geteuid() == 0 else None
    host_dir = tempfile.mkdtemp(prefix="dsj_sandbox_")
    try:
        with open(os.path.join(host_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            with open(os.path.join(host_dir, "stdin"), "wb") as f:
                f.write(data)
        if mode == "plain" and uid is not None:
            # The directory itself is the workspace here, so the code's uid must own it.
            os.chown(host_dir, uid, uid)
        config = dict(mode=mode, uid=uid, host_dir=host_dir, timeout_s=timeout_s, cpu_s=cpu_s,
                      memory_mb=memory_mb, file_size_mb=file_size_mb, max_procs=max_procs,
                      disk_mb=disk_mb, python=python or default_python())
        return _run_launcher(config, max_output_bytes)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


@functools.cache
def isolation_mode() -> str:
    """"namespaces" if a full namespaced run works on this machine, else "plain"."""
    try:
        result = run_sandboxed("print('ok')", timeout_s=10, isolation="namespaces")
        if result.ok and result.stdout == "ok\n":
            return "namespaces"
        reason = f"probe run failed: {result}"
    except (SandboxError, OSError) as e:
        reason = str(e)
    log.warning("Sandbox falls back to 'plain' isolation (no network or filesystem "
                "isolation) because namespaces are unavailable: %s", reason)
    return "plain"


@functools.cache
def default_python() -> str:
    """An interpreter an unprivileged uid can execute (this one if possible).

    A venv or pyenv under /root is unreadable once we drop to a sandbox uid, so then
    the system python3 runs the code; `-I -S` means only its stdlib is used anyway.
    """
    ours = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return ours
    for candidate in (ours, "/usr/local/bin/python3", "/usr/bin/python3"):
        path = os.path.realpath(candidate)
        if os.path.exists(path) and _world_executable(path):
            return path
    raise SandboxError(f"No Python interpreter that an unprivileged uid can execute: {ours} "
                       "sits under a directory others cannot enter, and no system python3 "
                       "was found. Pass python=PATH to run_sandboxed.")


def _world_executable(path: str) -> bool:
    """Whether 'others' may traverse every parent of `path`, and execute/read it.

    Sandbox uids have no groups, so only the 'other' permission bits apply to them.
    """
    if stat.S_IMODE(os.stat(path).st_mode) & 0o005 != 0o005:
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _run_launcher(config: dict, max_output_bytes: int) -> SandboxResult:
    """Starts the launcher, collects capped output and its status report."""
    prefix = []
    if config["mode"] == "namespaces":
        unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
        if unshare is None:
            raise SandboxError("isolation='namespaces' needs the util-linux `unshare` binary.")
        prefix = [unshare, "--mount", "--net", "--pid", "--ipc", "--fork", "--kill-child"]
        if os.geteuid() != 0:
            prefix[1:1] = ["--user", "--map-root-user"]
    status_r, status_w = os.pipe()
    config["status_fd"] = status_w
    argv = prefix + [os.path.realpath(sys.executable), "-I", "-S", "-B",
                     os.path.abspath(__file__), json.dumps(config)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(status_w,),
                                start_new_session=True, cwd=config["host_dir"],
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    out, err, status, truncated, backstop = _collect(proc, status_r, max_output_bytes,
                                                     config["timeout_s"] + _GRACE_S)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if backstop:  # the launcher itself overran: it and its session were killed
        return SandboxResult(False, None, stdout, stderr, True, "wall_timeout", truncated)
    try:
        report = json.loads(status)
    except ValueError:
        raise SandboxError(f"Sandbox launcher exited ({proc.returncode}) without a status "
                           f"report; its stderr: {stderr[-2000:]!r}") from None
    if report.get("error"):
        raise SandboxError(f"Sandbox launcher failed ({config['mode']} mode): {report['error']}")
    if report["leftover"]:
        log.warning("Sandbox could not kill every process of the run (plain mode?): %s",
                    report["leftover"])
    return _result(report, config["cpu_s"], stdout, stderr, truncated)


def _result(report: dict, cpu_s: int, stdout: str, stderr: str, truncated: bool):
    """Turns the launcher's report into a SandboxResult with a killed_reason."""
    code, sig, timed_out = report["exit"], report["signal"], report["timed_out"]
    last_line = stderr.rstrip().rsplit("\n", 1)[-1]
    if timed_out:
        reason = "wall_timeout"
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and report["cpu_s"] >= cpu_s):
        reason = "cpu_time"  # SIGXCPU at the soft limit, SIGKILL at the hard one
    elif sig == signal.SIGXFSZ or (code and "[Errno 27]" in last_line):
        reason = "file_size"  # Python ignores SIGXFSZ, so writes fail with EFBIG (27)
    elif code and last_line.startswith("MemoryError"):
        reason = "memory"  # RLIMIT_AS makes allocations fail rather than the OOM killer
    elif sig is not None:
        reason = f"signal:{_signal_name(sig)}"
    else:
        reason = None
    returncode = -sig if sig is not None else code
    return SandboxResult(not timed_out and code == 0, returncode, stdout, stderr, timed_out,
                         reason, truncated)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc, status_r, cap, limit_s):
    """Reads stdout, stderr and the status pipe until all close or `limit_s` passes.

    Output beyond `cap` bytes per stream is read and dropped so a flooding program
    can neither block on a full pipe nor grow the trainer's memory.
    """
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
    truncated = backstop = False
    deadline = time.monotonic() + limit_s
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                backstop = True
                _killpg(proc.pid)
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = len(chunk) if key.fd == status_r else max(cap - len(buf), 0)
                buf += chunk[:room]
                truncated |= room < len(chunk)
    try:
        proc.wait(timeout=_KILL_PATIENCE_S)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        proc.wait()
    finally:
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[status_r]), truncated, backstop


# ---------------------------------------------------------------------------------------
# The launcher: runs as `python -I -S sandbox.py CONFIG`, inside the namespaces when
# there are any, with the caller's privileges. Only the standard library is used.


def _launcher_main(config_json: str) -> None:
    config = json.loads(config_json)
    try:
        report = _launch(config)
    except Exception as e:  # reported to the trainer as SandboxError, never swallowed
        report = {"error": f"{type(e).__name__}: {e}"}
    os.write(config["status_fd"], json.dumps(report).encode())


def _launch(config: dict) -> dict:
    """Prepares the workspace, runs the code in a child, and reports how it ended."""
    host_dir, uid = config["host_dir"], config["uid"]
    with open(os.path.join(host_dir, "main.py"), "rb") as f:
        code = f.read()
    stdin_path = os.path.join(host_dir, "stdin")
    stdin_fd = os.open(stdin_path if os.path.exists(stdin_path) else os.devnull, os.O_RDONLY)
    if config["mode"] == "namespaces":
        _lock_down_filesystem(config["disk_mb"], uid)
        workdir = _WORK_IN_NAMESPACE
        with open(os.path.join(workdir, "main.py"), "wb") as f:
            f.write(code)
        if uid is not None:
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
    else:
        workdir = host_dir
    # Orphaned descendants are re-parented to us (we are PID 1 in namespaces mode anyway),
    # so _kill_descendants can reach processes that double-forked or called setsid.
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(err_r)
            _exec_untrusted(config, workdir, stdin_fd, keep_fd=err_w)
        except BaseException as e:
            os.write(err_w, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(127)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as f:
        exec_error = f.read().decode(errors="replace")  # EOF at a successful exec
    if exec_error:
        _kill_descendants()
        return {"error": f"could not start the sandboxed interpreter: {exec_error}"}
    status, cpu_s, timed_out = _wait(pid, config["timeout_s"])
    leftover = _kill_descendants()
    return {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": timed_out, "cpu_s": cpu_s, "leftover": leftover}


def _lock_down_filesystem(disk_mb: int, uid: int | None) -> None:
    """Makes every mount read-only, then a private tmpfs at /tmp and our own /proc.

    Only this mount namespace changes. Flags the kernel may have locked (nosuid, nodev,
    noexec, atime) are kept, since a user namespace may not clear them.
    """
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        mount_point = _unescape_mountinfo(fields[4])
        flags = sum(_MOUNT_OPTION_FLAGS.get(opt, 0) for opt in fields[5].split(","))
        _mount(None, mount_point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags, None)
    owner = 0 if uid is None else uid
    _mount("tmpfs", _WORK_IN_NAMESPACE, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={disk_mb}m,mode=700,uid={owner},gid={owner}")
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)


def _unescape_mountinfo(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    parts = path.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def _exec_untrusted(config: dict, workdir: str, stdin_fd: int, keep_fd: int) -> None:
    """In the forked child: limits, no privileges, then exec the isolated interpreter."""
    os.setpgid(0, 0)
    os.chdir(workdir)
    os.dup2(stdin_fd, 0)
    # Close everything else, above all the status pipe, so the code cannot forge a report.
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd != keep_fd:
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor listdir used, already gone
    mib = 1 << 20
    limits = {
        resource.RLIMIT_CPU: (int(config["cpu_s"]), int(config["cpu_s"]) + 1),
        resource.RLIMIT_AS: (config["memory_mb"] * mib,) * 2,
        resource.RLIMIT_FSIZE: (config["file_size_mb"] * mib,) * 2,
        resource.RLIMIT_NPROC: (config["max_procs"],) * 2,
        resource.RLIMIT_NOFILE: (_NOFILE,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for res, (soft, hard) in limits.items():
        current_hard = resource.getrlimit(res)[1]
        if current_hard != resource.RLIM_INFINITY:  # never ask for more than we have
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(res, (soft, hard))
    _drop_privileges(config["uid"])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    python = config["python"]
    os.execve(python, [python, "-I", "-S", "-B", "-X", "utf8", "main.py"], env)


def _drop_privileges(uid: int | None) -> None:
    """Leaves the child no way to regain privileges across exec.

    Real root becomes `uid` (RLIMIT_NPROC is then enforced). The uid 0 of a user
    namespace cannot change uid (only 0 is mapped), so it keeps it but loses every
    capability: empty bounding and ambient sets, and SECBIT_NOROOT so exec does not
    grant root its usual full set. no_new_privs disables setuid bits and file caps.
    """
    if os.geteuid() == 0:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        for cap in range(last_cap + 1):
            _prctl(_PR_CAPBSET_DROP, cap)
        if uid is None:
            _prctl(_PR_SET_SECUREBITS, _SECBIT_NOROOT | _SECBIT_NOROOT_LOCKED)
        else:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _wait(pid: int, timeout_s: float) -> tuple[int, float, bool]:
    """Waits for `pid`, reaping orphans meanwhile; SIGKILLs it at the deadline.

    Returns (wait status, CPU seconds used by pid, timed_out).
    """
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while True:
        reaped, status, usage = os.wait4(-1, os.WNOHANG)
        if reaped == pid:
            return status, usage.ru_utime + usage.ru_stime, timed_out
        if reaped:
            continue  # an orphan: reap it so zombies don't count against RLIMIT_NPROC
        if not timed_out and time.monotonic() >= deadline:
            timed_out = True
            _killpg(pid)  # its whole group at once: a fork bomb stops spreading now
        time.sleep(0.005)


def _kill_descendants() -> list[int]:
    """SIGKILLs the whole process tree below us; returns pids that survived (normally none).

    Each round kills our direct children; their orphans are re-parented to us (subreaper
    or PID 1), so the next round reaches them. Ends when no child, zombie or not, is left.
    """
    me, children = os.getpid(), []
    end = time.monotonic() + _KILL_PATIENCE_S
    while time.monotonic() < end:
        children = _children_of(me)
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return []
        time.sleep(0.001)
    return children


def _children_of(ppid: int) -> list[int]:
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                # The command name may contain spaces or ')', so split after its last ')'.
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == ppid:
            children.append(int(name))
    return children


@functools.cache
def _libc():
    import ctypes  # only the launcher needs it; keep it out of the trainer

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount({source}, {target}, {fstype}, {flags:#x})")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc().prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


if __name__ == "__main__":
    _launcher_main(sys.argv[1])
