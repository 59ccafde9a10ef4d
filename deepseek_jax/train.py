"""Train a model: `python -m deepseek_jax.train --config CFG --workdir DIR`.

    python -m deepseek_jax.train --config configs/tiny_v3.py --workdir runs/tiny_v3
    python -m deepseek_jax.train --config configs/tiny_v3.py:f32 --config.total_steps=50 \\
        --config.data.batch_size=8 --workdir runs/tiny
    # multi-host (or run under SLURM / Open MPI, detected automatically):
    python -m deepseek_jax.train --config CFG --workdir DIR \\
        --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0

    # the RL stage: loss=grpo runs the GRPO loop (rl/grpo.py) from the SFT run's weights
    python -m deepseek_jax.train --config configs/r1_tiny.py:grpo --workdir runs/demo/grpo \
        --config.init_from=runs/demo/sft

Restarting the same command resumes from the newest complete checkpoint in DIR/checkpoints;
a command whose model config differs from the checkpoints' is refused (nothing written).
SIGTERM saves a checkpoint at the current step and exits 0. Outputs: DIR/metrics.jsonl,
DIR/tb/ (TensorBoard), DIR/checkpoints/ (Orbax), DIR/config.json. Progress: a tqdm bar on
a terminal, else one line every log_every steps (step, loss, lr, tokens/s, ETA).
Exit codes: 0 done or stopped by SIGTERM, 1 unexpected error, 2 refused command line or
config (one line; traceback with --verbosity=1), 3 a checkpoint save failed (disk full:
the last good checkpoint is named; rerun to resume from it), 4 a peer process was lost.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from deepseek_jax import cli

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
    # --- the loop (trainer.py: mesh, input, model, state, step, checkpoints, evals, metrics;
    # loss=grpo: rl/grpo.py) ---
    from deepseek_jax import trainer

    trainer.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main, "deepseek_jax.train", __doc__)
