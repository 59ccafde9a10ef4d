"""Runs one command as N local JAX processes, the way a cluster would: the multi-host path
on one machine (CPU devices, gloo collectives).

    python experiments/launch_local.py --num_processes 2 --devices_per_process 4 -- \
        python -m deepseek_jax.train --config configs/tiny_v3.py --workdir runs/mh

Each process gets `--coordinator 127.0.0.1:PORT --num_processes N --process_id I` appended
and `--xla_force_host_platform_device_count=K` in XLA_FLAGS. Output lines are prefixed
with the process index. If one process fails, the others get `--grace_s` seconds to exit
on their own (they should: the coordination service notices the lost peer) and are then
killed; the launcher exits with the first failure's code.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def launch(command: list[str], num_processes: int, devices_per_process: int,
           port: int | None = None, grace_s: float = 60.0, cwd: str | None = None,
           extra_env: dict | None = None) -> int:
    port = port or free_port()
    procs = []
    for i in range(num_processes):
        argv = command + [f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}",
                          f"--process_id={i}"]
        p = subprocess.Popen(argv, env={**child_env(devices_per_process), **(extra_env or {})}, cwd=cwd,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_pump, args=(p.stdout, f"[{i}] "), daemon=True).start()
        procs.append(p)
    first_failure, deadline = 0, None
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.returncode not in (None, 0) and not first_failure:
                first_failure, deadline = p.returncode, time.monotonic() + grace_s
                print(f"[launcher] process {i} exited with code {p.returncode}; the others get "
                      f"{grace_s:.0f} s to stop before they are killed", flush=True)
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    codes = [p.returncode for p in procs]
    return first_failure or next((c for c in codes if c), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--grace_s", type=float, default=60.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sys.exit(launch(command, args.num_processes, args.devices_per_process, args.port, args.grace_s))


if __name__ == "__main__":
    main()
