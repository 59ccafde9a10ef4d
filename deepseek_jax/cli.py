"""What every command line shares: clean refusals, quiet libraries, documented exit codes.

    cli.run(main, "deepseek_jax.train", __doc__)      # instead of absl's app.run(main)

* `--help` prints the module's docstring, its flags and where the config keys are listed,
  and exits 0 (absl's own `--help` exits 1).
* A refusal (a bad config value, an unknown key, a path that is not what it should be)
  prints ONE line `PROG: error: ...` and exits 2. The traceback is printed only with
  `--verbosity=1` (or higher) or DEEPSEEK_JAX_TRACEBACK=1.
* Library INFO logs (absl, Orbax) are off unless `--verbosity` is given; our own progress
  (the `deepseek_jax` loggers) stays at INFO.
* Exit codes: 0 done (also: stopped by SIGTERM after saving), 1 an unexpected error (with
  its traceback), 2 a refused command line or config, 3 a checkpoint save failed (e.g.
  disk full; the last good checkpoint is named, rerun to resume from it), 4 a peer
  process was lost (multi-host; rerun every process to resume), 5 out of memory (compiling
  or running; rerun with a smaller footprint resumes from the last checkpoint).
* Errors end the process with `os._exit` once the message is out: Orbax's background
  threads otherwise print thousands of "Event loop is closed" lines at interpreter exit.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import traceback

from absl import app, flags
from absl import logging as absl_logging

EXIT_USAGE, EXIT_CHECKPOINT, EXIT_PEER, EXIT_OOM = 2, 3, 4, 5
OOM_ADVICE = ("the newest complete checkpoint in the workdir is kept and a rerun resumes from it. To fit: "
              "raise microbatches, lower data.batch_size or data.seq_len, set remat=full, or shard more "
              "(mesh.fsdp / mesh.expert); `python -m deepseek_jax.plan --config CFG --devices N` shows the "
              "bytes per device before a run")
TRACEBACK_ENV = "DEEPSEEK_JAX_TRACEBACK"
CONFIG_KEYS_HINT = ("Config keys: every key of deepseek_jax/experiment.py:default_config() (README "
                    "'Configuration'), set as --config.KEY=VALUE, e.g. --config.total_steps=50 "
                    "--config.data.batch_size=8.")


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; the message names the last good one."""


class PeerLost(RuntimeError):
    """Another process of a multi-host run went away."""


def _usage_errors() -> tuple:
    from deepseek_jax.config import ConfigError
    from deepseek_jax.hf import CheckpointError
    from deepseek_jax.loading import LoadError

    return (ConfigError, LoadError, CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError,
            ValueError, KeyError, app.UsageError, flags.Error)


def out_of_memory(e: BaseException) -> bool:
    """XLA's allocation failures (compile-time buffer assignment or run time) on any backend."""
    text = str(e)
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


def _want_traceback(argv) -> bool:
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    for a in argv:
        if a.startswith(("--verbosity=", "-v=")):
            try:
                return int(a.split("=", 1)[1]) >= 1
            except ValueError:
                return False
    return False


def _message(e: BaseException) -> str:
    # KeyError's str() is the repr of its message; config_flags puts "Did you mean" in one.
    text = str(e.args[0]).strip("'\"") if isinstance(e, KeyError) and e.args else str(e)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines)[:2000] or type(e).__name__


def exit_now(code: int) -> None:
    """Flushes and leaves without interpreter teardown (see the module docstring)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(prog: str, e: BaseException, code: int, argv) -> None:
    if _want_traceback(argv):
        traceback.print_exception(e)
    else:
        hint = f"  (traceback: --verbosity=1 or {TRACEBACK_ENV}=1)" if code == EXIT_USAGE else ""
        print(f"{prog}: error: {_message(e)}{hint}", file=sys.stderr)
    exit_now(code)


class _OrbaxErrorFilter(logging.Filter):
    """Drops Orbax's background-thread error reports (each with a traceback; a full disk
    gives five of them): the same error is raised again in the main thread, where
    checkpoint.py turns it into one message naming the last good checkpoint."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _is_closed_loop_noise(exc_type, exc) -> bool:
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _drop_closed_loop_noise() -> None:
    """tensorstore's callbacks for a failed Orbax save land on an asyncio loop that is already
    closed and report each RuntimeError as unraisable (one traceback per pending write:
    hundreds when a disk fills). The save's own error reaches the main thread, so these are
    dropped unless a traceback was asked for. A background writer thread that dies of a full
    disk (tensorboardX's) leaves one warning line instead of its traceback: the checkpoint
    save reports the disk with the last good checkpoint."""
    default_excepthook, default_unraisablehook = sys.excepthook, sys.unraisablehook
    default_thread_hook = threading.excepthook

    def thread_hook(args):
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT):
            logging.getLogger("deepseek_jax").warning("a background writer (thread %s) stopped: %s",
                                                      getattr(args.thread, "name", "?"), args.exc_value)
        else:
            default_thread_hook(args)

    def excepthook(exc_type, exc, tb):
        if not _is_closed_loop_noise(exc_type, exc):
            default_excepthook(exc_type, exc, tb)

    def unraisablehook(unraisable):
        if not _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
            default_unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook, threading.excepthook = excepthook, unraisablehook, thread_hook


def quiet_logs() -> None:
    """Our progress at INFO, libraries that log through absl (Orbax) at WARNING."""
    if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("absl").addFilter(_OrbaxErrorFilter())
    logging.getLogger("deepseek_jax").setLevel(logging.INFO)


def run(main, prog: str, doc: str) -> None:
    """absl's app.run(main) with the behaviour of the module docstring."""
    def parse(argv):
        if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
            print(doc.strip() + "\n")
            print(flags.FLAGS.main_module_help())
            print("\n" + CONFIG_KEYS_HINT)
            sys.exit(0)
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - config_flags raises KeyError/ValueError/IOError too
            fail(prog, e, EXIT_USAGE, argv)

    def guarded(argv):
        quiet_logs()
        if not _want_traceback(sys.argv):
            _drop_closed_loop_noise()
        try:
            main(argv)
        except SaveFailed as e:
            fail(prog, e, EXIT_CHECKPOINT, sys.argv)
        except PeerLost as e:
            fail(prog, e, EXIT_PEER, sys.argv)
        except _usage_errors() as e:
            fail(prog, e, EXIT_USAGE, sys.argv)
        except Exception as e:  # noqa: BLE001 - unexpected: the whole traceback, then a clean exit
            if out_of_memory(e):
                first = _message(e).split(". ")[0]
                fail(prog, RuntimeError(f"out of memory ({first}); {OOM_ADVICE}"), EXIT_OOM, sys.argv)
            traceback.print_exc()
            exit_now(1)

    app.run(guarded, flags_parser=parse)
