"""Multi-controller start-up: one process per host (or per GPU), all running the same program.

`initialize(...)` is called first thing by the entry points:
  * explicit flags (`--coordinator HOST:PORT --num_processes N --process_id I`) win;
  * otherwise a SLURM (`SLURM_NTASKS`) or Open MPI (`OMPI_COMM_WORLD_SIZE`) job with more
    than one task is detected and JAX's own cluster detection fills in the rest;
  * otherwise this is a single-process run and nothing is initialised.
On CPU the collectives go through gloo, which is what lets the multi-host code paths run
as several local processes in the tests.

A peer that dies is noticed by the coordination service's heartbeat: the survivors fail
with an error after `heartbeat_timeout_s` instead of waiting forever in a collective.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import jax

log = logging.getLogger(__name__)


def cluster_world_size() -> int:
    """Tasks in the surrounding SLURM / Open MPI job (1 when there is none)."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None, *,
               timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> bool:
    """Joins the multi-process job if there is one; returns whether one was joined."""
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit and None in (coordinator, num_processes, process_id):
        raise ValueError(
            f"multi-host flags: got coordinator={coordinator!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}; give all three (or none, to auto-detect SLURM / Open MPI).")
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    if not explicit and cluster_world_size() <= 1:
        return False
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    if explicit:
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    return True


def describe() -> str:
    """One line for the top of the log: who am I and what can I see."""
    return (f"process {jax.process_index()}/{jax.process_count()}: "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices "
            f"({jax.devices()[0].platform})")


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name` (a no-op in a single process).

    Uses the coordination service, not a device collective: gloo gives a peer only 30 s to
    join a new communicator, so processes that reach their first collective minutes apart
    (one still compiling on a loaded host) must meet here first.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the coordination-service client

    jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
