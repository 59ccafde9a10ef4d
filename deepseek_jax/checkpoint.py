"""Orbax checkpoints of everything a run needs to continue exactly where it stopped.

One checkpoint = one step directory `DIR/checkpoints/<step>/` with three items:

    state    the TrainState (params, optimizer state, RNG key data, step, skipped count),
             saved with `StandardSave`; restored into the shardings of an abstract state, so
             a checkpoint written on one mesh restores on another.
    data     the Grain iterator position, one JSON file per process
             (`process_<i>-of-<n>.json`, grain's own checkpoint handler).
    config   the experiment ConfigDict as JSON, for humans and for `generate`/`convert`.

Why these choices:
* Atomic commit is Orbax's: a step is written under a temporary name and renamed once
  every process has finished, so a crash mid-save leaves no directory that looks complete.
* Saves are asynchronous (the device->host copy happens in `save`, the file writes in a
  background thread) so the accelerator keeps stepping. The data position is snapshotted
  in `save` too, because the live iterator moves on while the background thread writes.
* A newest checkpoint that is complete but unreadable (a truncated file, a disk error)
  must not kill the run: `restore` logs which one failed and falls back to the previous
  one, then moves the bad directory aside (`<step>.unreadable`) so that the step can be
  saved again. If no checkpoint is readable it raises the newest one's error rather than
  silently starting from scratch (a restore bug would otherwise throw away a run).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deepseek_jax.cli import SaveFailed

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
UNREADABLE_SUFFIX = ".unreadable"
# Orbax splits the writing of a replicated array across its replicas; each split is an
# on-device slice compiled per shape (hundreds of tiny compiles, ~40 s for a small model
# on CPU). Only arrays whose per-replica share is at least this big are split.
MIN_REPLICA_PARALLEL_BYTES = 4 << 20
_handler_registered = False


def _register_array_handler() -> None:
    global _handler_registered
    if not _handler_registered:
        handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        _handler_registered = True


class _IteratorSnapshot:
    """The data position at save time, in the form grain's handler writes.

    Grain's handler calls `item.get_state()` when Orbax runs it, which may be after the
    trainer has already pulled the next batch. A non-DatasetIterator item must return the
    state as bytes; the handler writes them decoded, which is exactly the JSON a
    DatasetIterator's state would be written as, so `restore` reads it back as usual.
    """

    def __init__(self, state: dict):
        self._json = json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._json


@dataclasses.dataclass
class Restored:
    step: int  # the checkpoint's step
    state: Any  # the TrainState, in the target shardings
    config: Optional[dict]  # the saved config (plain dict), if it was saved
    data_restored: bool  # whether the iterator given to `restore` was moved to the saved position


def _config_json(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=repr))


class Checkpointer:
    """A CheckpointManager over `directory` that keeps the newest `keep` checkpoints."""

    def __init__(self, directory: str, *, keep: Optional[int] = 3, async_save: bool = True):
        _register_array_handler()
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
            # A save killed before its commit leaves `<step>.orbax-checkpoint-tmp`; remove it
            # at start-up so that the resumed run can save that step again.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ----- queries ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def reached_preemption(self, step: int) -> bool:
        """True once every process reached the sync point of a preemption notice
        (jax.distributed's preemption service; always False in a single process)."""
        return self.manager.reached_preemption(step)

    # ----- save ------------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, data_iterator=None, config=None, force: bool = False) -> bool:
        """Starts an async save of `state` (and the iterator position / config) at `step`.

        Returns False when a checkpoint of that step exists already (e.g. the final save
        right after a periodic one). Every process must call this (Orbax synchronises).
        """
        if step in self.manager.all_steps():
            return False
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(_config_json(config))
        try:
            # Also raises the error of the previous (asynchronous) save, if it failed.
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - a file-system error becomes SaveFailed
            raise self._save_failed(e) from e

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from e

    def latest_good(self) -> Optional[str]:
        """The newest committed step directory on disk (what a rerun resumes from), or None."""
        steps = [int(d) for d in os.listdir(self.directory) if d.isdigit()
                 and os.path.exists(os.path.join(self.directory, d, "_CHECKPOINT_METADATA"))] \
            if os.path.isdir(self.directory) else []
        return self.step_dir(max(steps)) if steps else None

    def _save_failed(self, e: Exception) -> Exception:
        """SaveFailed naming the cause and the last good checkpoint when `e` is (or wraps) a
        file-system error; other errors are handed back unchanged."""
        cause, seen = e, set()
        while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        text = str(e)
        if not isinstance(cause, OSError) and "Errno" not in text and "No space left" not in text:
            return e
        # Tensorstore's message is long ("RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']").
        ts_error = re.search(r"([^:\]]+?) \[os_error_code='(\d+)'\]", text)
        if isinstance(cause, OSError) and cause.strerror:
            reason = f"[Errno {cause.errno}] {cause.strerror}"
        elif ts_error:
            reason = f"[Errno {ts_error[2]}] {ts_error[1].strip()}"
        else:
            reason = text.strip().splitlines()[0][:200]
        good = self.latest_good()
        return SaveFailed(f"saving a checkpoint in {self.directory} failed: {reason}. Last good checkpoint: "
                          f"{good or 'none (no step was saved)'}. Free space (or fix the file system) and "
                          f"rerun the same command: it resumes from {'there' if good else 'step 0'}.")

    def close(self) -> None:
        self.manager.close()

    # ----- restore ---------------------------------------------------------------------------

    def restore_step(self, step: int, abstract_state: Any, *, data_iterator=None) -> Restored:
        """Restores one step; `abstract_state` is a tree of ShapeDtypeStructs with shardings."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        # Every process iterates the same global pipeline (trainer.py), so any process's saved
        # position is every process's: a run may resume on a different process count.
        data_dir = os.path.join(self.step_dir(step), DATA)
        own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        saved = sorted(f for f in os.listdir(data_dir) if f.startswith("process_")) \
            if os.path.isdir(data_dir) else []
        if data_iterator is not None and os.path.isfile(own):
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        if os.path.isdir(os.path.join(self.step_dir(step), CONFIG)):
            items[CONFIG] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        data_restored = DATA in items
        if data_iterator is not None and not data_restored and saved:
            with open(os.path.join(data_dir, saved[0])) as f:
                data_iterator.set_state(json.load(f))
            data_restored = True
            log.info("data position restored from %s (saved by a different process count)", saved[0])
        elif data_iterator is not None and not data_restored:
            log.warning("checkpoint %s has no data-iterator state: the input restarts from its "
                        "beginning", self.step_dir(step))
        return Restored(step=step, state=out[STATE], config=out.get(CONFIG) if CONFIG in items else None,
                        data_restored=data_restored)

    def restore(self, abstract_state: Any, *, data_iterator=None) -> Optional[Restored]:
        """Restores the newest readable checkpoint, or returns None when there is none.

        Falls back step by step past unreadable ones (module docstring). The data
        iterator is only touched by a successful restore of all items.
        """
        steps = self.all_steps()
        first_error, bad = None, []
        for step in reversed(steps):
            try:
                restored = self.restore_step(step, abstract_state, data_iterator=data_iterator)
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous "
                            "checkpoint", self.step_dir(step), type(e).__name__, str(e)[:500])
                first_error = first_error or e
                bad.append(step)
                continue
            if bad:
                self._quarantine(bad)
            return restored
        if first_error is not None:
            raise RuntimeError(
                f"none of the checkpoints {steps} in {self.directory} could be restored; the newest "
                f"failed with the error above. Fix or remove them (or use another --workdir) to "
                f"start afresh.") from first_error
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable step directories aside so Orbax neither lists nor overwrites them."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.step_dir(step)
                dst = src + UNREADABLE_SUFFIX
                n = 1
                while os.path.exists(dst):
                    dst, n = f"{src}{UNREADABLE_SUFFIX}.{n}", n + 1
                os.rename(src, dst)
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("deepseek_jax.checkpoint.quarantine")
        self.manager.reload()
