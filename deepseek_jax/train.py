"""Train a model: `python -m deepseek_jax.train --config CFG --workdir DIR`.

    python -m deepseek_jax.train --config configs/tiny_v3.py --workdir runs/tiny_v3
    python -m deepseek_jax.train --config configs/tiny_v3.py:f32 --config.total_steps=50 \\
        --config.data.batch_size=8 --workdir runs/tiny
    # multi-host (or run under SLURM / Open MPI, detected automatically):
    python -m deepseek_jax.train --config CFG --workdir DIR \\
        --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0

Restarting the same command resumes from the newest complete checkpoint in DIR/checkpoints.
SIGTERM saves a checkpoint at the current step and exits 0. Outputs: DIR/metrics.jsonl,
DIR/tb/ (TensorBoard), DIR/checkpoints/ (Orbax), DIR/config.json.
"""
from __future__ import annotations

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "Devices this process uses (multi-host).")
_PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout_s", 100, "Multi-host: seconds without a heartbeat after which a lost process "
    "makes the others fail (instead of waiting in a collective forever).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # --- multi-host start-up: before anything asks JAX for devices ---
    from deepseek_jax import distributed

    local_ids = [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, local_ids,
                           heartbeat_timeout_s=_PEER_TIMEOUT.value)
    # Our progress at INFO; libraries that log through absl (Orbax: several lines per save) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("deepseek_jax").setLevel(logging.INFO)

    # --- the loop (trainer.py: mesh, input, model, state, step, checkpoints, evals, metrics) ---
    from deepseek_jax import trainer

    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
