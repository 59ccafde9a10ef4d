"""trainer.py / train.py: config checks, batch assembly, and the command line end to end.

End-to-end oracles: an uninterrupted run of the same command. A run killed with SIGKILL
and restarted must log exactly its losses (and every other deterministic metric) at every
step; steps before the kill also show that two runs of one config agree bitwise. SIGTERM
must leave a committed checkpoint at the step reached and exit 0.

The subprocesses share the tests' persistent compilation cache, so only the first one
compiles; the model is tiny_v3 cut to two layers (one dense, one MoE with router bias) and
[8, 32] batches.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from deepseek_jax import experiment, sharding, trainer
from deepseek_jax.config import ConfigError
from tests.test_metrics import decode_png, read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 24
ARGS = [
    "--config", "configs/tiny_v3.py:f32", f"--config.total_steps={TOTAL}",
    "--config.model.num_hidden_layers=2", "--config.optimizer.warmup_steps=2",
    "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.data.num_problems=2000",
    "--config.log_every=1", "--config.checkpoint_every=4", "--config.eval_every=8",
    "--config.eval_batches=1", "--config.progress=False",
]
# Not reproducible by design: wall-clock rates, and the pipeline's running counters that
# restart from zero in a resumed process (data/stats.py).
NONDETERMINISTIC = ("tokens_per_s", "mfu", "data/documents", "data/tokens", "data/truncated",
                    "data/dropped_overlong", "data/dropped_too_short", "data/dropped_no_loss")


# ----- in-process: config checks and batches ------------------------------------------------

def _cfg(*overrides):
    return experiment.load_config("configs/tiny_v3.py:f32", list(overrides))


@pytest.mark.parametrize("overrides, field, fix", [
    (["data.batch_size=12"], "data.batch_size=12", "multiple of 8"),
    (["microbatches=3"], "data.batch_size=16", "microbatches=3"),
    (["microbatches=4"], "data.batch_size=16", "multiple of 32"),
    (["mesh.data=3"], "mesh", "3"),
    (["loss='bogus'"], "loss='bogus'", "pretrain"),
    (["data.seq_len=1024"], "data.seq_len=1024", "max_position_embeddings=512"),
    (["compute_dtype='float16'"], "compute_dtype='float16'", "bfloat16"),
    (["log_every=0"], "log_every=0", ">= 1"),
    (["data.kind='csv'"], "data.kind='csv'", "jsonl"),
    (["data.kind='jsonl'"], "data.path=''", "file or glob"),
    (["mesh.expert=8", "mesh.data=1", "model.n_routed_experts=12"], "mesh.expert=8", "n_routed_experts=12"),
])
def test_validate_config_names_field_value_and_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as e:
        trainer.validate_config(_cfg(*overrides), num_devices=8, process_count=1)
    assert field in str(e.value) and fix in str(e.value)


def test_validate_config_checks_process_split_and_optimizer():
    with pytest.raises(ConfigError, match="3 processes"):
        trainer.validate_config(_cfg("data.batch_size=16"), num_devices=48, process_count=3)
    with pytest.raises(ValueError, match="warmup_steps"):
        trainer.validate_config(_cfg("total_steps=5"), num_devices=8, process_count=1)
    assert trainer.validate_config(_cfg("mesh.fsdp=2"), 8, 1) == dict(data=4, fsdp=2, expert=1, tensor=1)


def test_global_batch_places_rows_on_the_batch_sharding():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2, "tensor": 1})
    local = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
             "loss_mask": np.linspace(0, 1, 40, dtype=np.float32).reshape(8, 5)}
    got = trainer.global_batch(local, mesh)
    for k, v in local.items():
        assert got[k].sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(got[k]), v)
        # Device i holds rows [i, i + 1): the batch axes split rows in device order.
        shard_rows = sorted(int(s.index[0].start) for s in got[k].addressable_shards)
        assert shard_rows == list(range(8))


def test_build_data_train_and_heldout():
    cfg = _cfg("data.seq_len=32", "data.batch_size=8", "data.num_problems=500")
    train = trainer.build_data(cfg, "train", model_vocab=264)
    heldout = trainer.build_data(cfg, "heldout")
    assert "train" in train.stats.sources[0].name and "heldout" in heldout.stats.sources[0].name
    batch = next(iter(train.dataset))
    assert {k: v.shape for k, v in batch.items()} == {k: (8, 32) for k in
                                                       ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        trainer.build_data(cfg, "train", model_vocab=100)
    with pytest.raises(ConfigError, match="bring their own batches"):
        trainer.build_data(_cfg("loss='grpo'"), "train")


def test_resuming_with_a_changed_config_warns(caplog):
    saved = json.loads(_cfg().to_json_best_effort())
    with caplog.at_level("WARNING", logger="deepseek_jax.trainer"):
        trainer._warn_config_changes(saved, _cfg("total_steps=300", "optimizer.learning_rate=0.01"))
    (message,) = [r.getMessage() for r in caplog.records]
    assert "total_steps: 200 -> 300" in message and "optimizer.learning_rate: 0.003 -> 0.01" in message
    caplog.clear()
    trainer._warn_config_changes(saved, _cfg())
    assert not caplog.records


# ----- end to end: the command line ---------------------------------------------------------

def _env():
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _start(workdir, log_name="log.txt"):
    log = open(os.path.join(os.path.dirname(workdir), log_name), "ab")
    cmd = [sys.executable, "-m", "deepseek_jax.train", *ARGS, "--workdir", workdir]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log.name


def _run(workdir, log_name="log.txt"):
    proc, log = _start(workdir, log_name)
    rc = proc.wait(timeout=900)
    assert rc == 0, open(log).read()[-4000:]
    return open(log).read()


def _records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written right now
    return out


def _wait_for_step(proc, workdir, step, log, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = _records(workdir)
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        assert proc.poll() is None, f"run ended early:\n{open(log).read()[-4000:]}"
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def _deterministic(records):
    return {r["step"]: {k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in records}


def _check_reference(workdir):
    """The uninterrupted run: the metrics contract, learning, checkpoints kept, TensorBoard."""
    records = _records(workdir)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    last = records[-1]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "skipped", "skipped_total",
                "moe/layer0/max_over_mean", "moe/layer0/cv", "moe/cv", "moe/drop_rate",
                "data/malformed_skipped", "data/empty_skipped", "data/truncated", "eval/loss"):
        assert key in last, key
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert "eval/loss" in records[7] and "eval/loss" not in records[8]
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [16, 20, 24]

    events = read_events(os.path.join(workdir, "tb"))
    assert [s for s, _ in events["loss"]] == list(range(1, TOTAL + 1))
    losses = {r["step"]: r["loss"] for r in records}
    assert all(v == pytest.approx(losses[s], rel=1e-6) for s, v in events["loss"])
    assert "eval/loss" in events and "moe/cv" in events
    assert "moe/load/layer0" in events["__histograms__"]
    images = events["__images__"]["moe/expert_load_heatmap"]
    assert len(images) == TOTAL
    w, h, rgb = decode_png(images[-1].encoded_image_string)
    assert (w, h) == (8 * 12, 2 * 12)  # 8 experts x 2 MoE layers (main model + MTP block), 12 px cells
    assert rgb.std() > 0


@pytest.mark.slow
def test_command_line_sigterm_sigkill_resume_is_exact(tmp_path):
    """One test, so that pytest-xdist cannot run the reference twice on two workers."""
    reference = str(tmp_path / "reference" / "run")
    os.makedirs(os.path.dirname(reference))
    _run(reference)
    _check_reference(reference)
    want = _deterministic(_records(reference))

    # SIGTERM: a committed checkpoint at the step reached, exit code 0.
    workdir = str(tmp_path / "interrupted" / "run")
    os.makedirs(os.path.dirname(workdir))
    proc, log = _start(workdir)
    _wait_for_step(proc, workdir, 3, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, open(log).read()[-4000:]
    reached = _records(workdir)[-1]["step"]
    assert reached < TOTAL
    assert str(reached) in os.listdir(os.path.join(workdir, "checkpoints"))

    # Resume, then SIGKILL mid-run (perhaps mid-save: nothing gets a chance to clean up).
    proc, log = _start(workdir)
    killed_after = _wait_for_step(proc, workdir, reached + 7, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert killed_after < TOTAL

    # Resume again, to the end: every step as in the uninterrupted run, bit for bit (the
    # steps before the first signal also show that two runs of one config agree).
    output = _run(workdir)
    assert output.count("resumed from") == 2
    got = _deterministic(_records(workdir))
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in want:
        assert got[step] == want[step], (f"step {step} differs (SIGTERM after step {reached}, "
                                         f"SIGKILL after step {killed_after})")
