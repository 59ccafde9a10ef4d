"""The training loop behind `python -m deepseek_jax.train`, and the pieces other loops reuse.

    cfg = experiment.load_config("configs/tiny_v3.py:f32", ["total_steps=20"])
    trainer.train(cfg, "runs/tiny")                       # what the command line does

    # A loop with its own batches (GRPO): build once, feed global batches.
    mesh = trainer.build_mesh(cfg)
    parts = trainer.build_state_and_step(cfg, mesh)
    state = parts.init_state()                            # or Checkpointer(...).restore(parts.abstract_state)
    state, metrics = parts.train_step(state, trainer.global_batch(local_numpy_batch, mesh))

Data iteration is kept apart from the step: `build_data` gives this host's Grain
pipeline, `global_batch` turns a host's numpy batch into the global sharded batch.

Batch sizes: `data.batch_size` is the GLOBAL batch (rows per optimizer step). Every
process runs the same Grain pipeline and produces the same global batch; each device then
takes its own rows of it (`jax.make_array_from_callback`). So the data order is a function
of the seed and the global batch index only: the same batches come out whatever the
process count, and a checkpoint's data position restores on any process count. The cost
is that every host tokenises and packs the whole global batch (cheap next to a train
step of a model worth several hosts; a per-row-stream split would avoid it).

Exact resume: the checkpoint holds the TrainState (params incl. router biases, optimizer
state, RNG key data, step) and the Grain iterator position, so a run restarted from step
s sees the same batches and keys as one that never stopped; metrics.jsonl is cut back to
step s before logging resumes (metrics.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax import distributed, experiment, post_train, loading, losses, optim, sharding, warm_start
from deepseek_jax import train_step as ts
from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.cli import PeerLost, SaveFailed
from deepseek_jax.config import ConfigError
from deepseek_jax.data import pipeline as data_pipeline
from deepseek_jax.data import sources
from deepseek_jax.metrics import MetricsWriter, expert_load_stats, measure_peak_flops, model_flops_per_token
from deepseek_jax.model import Transformer, inference_model

log = logging.getLogger(__name__)

DATA_LOSSES = ("pretrain", "sft", "dpo")  # objectives this loop can feed from cfg.data
COMPUTE_DTYPES = ("bfloat16", "float32")
EXPERT_COUNTS = "moe/expert_counts"


# ----- configuration checks (before anything is compiled) -------------------------------------

def validate_config(cfg: ml_collections.ConfigDict, num_devices: Optional[int] = None,
                    process_count: Optional[int] = None) -> dict[str, int]:
    """Checks the experiment config against itself and the devices; returns the mesh sizes.

    Every error names the field, its value and a fix (STYLE.md rule 9).
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count

    def need(ok: bool, field: str, fix: str):
        if not ok:
            value = cfg
            for part in field.split("."):
                value = value.get(part) if isinstance(value, ml_collections.ConfigDict) else None
            raise ConfigError(f"{field}={value!r}: {fix}")

    need(cfg.loss in losses.LOSSES, "loss", f"use one of {sorted(losses.LOSSES)}")
    need(cfg.total_steps > 0, "total_steps", "must be positive")
    need(cfg.microbatches >= 1, "microbatches", "must be >= 1 (1 = no gradient accumulation)")
    need(cfg.log_every >= 1, "log_every", "must be >= 1")
    need(cfg.eval_every >= 0, "eval_every", "must be >= 0 (0 = never)")
    need(cfg.eval_batches >= 1 or not cfg.eval_every, "eval_batches", "must be >= 1 when eval_every > 0")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = only at the end)")
    need(cfg.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"use one of {COMPUTE_DTYPES}")
    need(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32) (Grain's shuffle seed)")
    sizes = sharding.mesh_shape(dict(cfg.mesh), num_devices)
    dp = math.prod(sizes[a] for a in sharding.BATCH_AXES)
    B, M = cfg.data.batch_size, cfg.microbatches
    need(B % process_count == 0, "data.batch_size",
         f"the global batch must split evenly over the {process_count} processes; use a multiple of {process_count}")
    need(B % M == 0, "data.batch_size", f"must be divisible by microbatches={M}; use a multiple of {M}")
    need((B // M) % dp == 0, "data.batch_size",
         f"each of the {M} micro-batches ({B // M} rows) must split over the {dp} data-parallel devices "
         f"(mesh {sizes}); use a multiple of {M * dp}")
    model_cfg = experiment.model_config(cfg)  # these three validate their own fields
    experiment.optimizer_config(cfg)
    experiment.loss_config(cfg)
    need(cfg.data.seq_len <= model_cfg.max_position_embeddings, "data.seq_len",
         f"exceeds model.max_position_embeddings={model_cfg.max_position_embeddings}; shorten it")
    kinds = ("synthetic", "mixture", *sorted(sources.SOURCES))
    need(cfg.data.kind in kinds, "data.kind", f"use one of {kinds}")
    need(cfg.data.kind in ("synthetic", "mixture") or bool(cfg.data.path), "data.path",
         f"data.kind={cfg.data.kind!r} reads files: set data.path to a file or glob")
    sharding.validate_for_mesh(model_cfg, sizes)
    return sizes


# ----- mesh, model, state and step -------------------------------------------------------------

def build_mesh(cfg: ml_collections.ConfigDict):
    return sharding.make_mesh(dict(cfg.mesh))


@dataclasses.dataclass
class Parts:
    """What a training loop needs besides data, built for one mesh."""

    model_config: Any
    model: Any
    optimizer: Any
    schedule: Callable
    loss_fn: Callable  # bound: loss_fn(params, batch, rng) -> (loss, metrics)
    mesh: Any
    rules: Any
    abstract_state: Any  # TrainState of ShapeDtypeStructs with shardings (Orbax restore target)
    train_step: Callable  # (state, global batch) -> (state, metrics)
    eval_step: Callable  # (params, global batch) -> metrics
    seed: int

    def init_state(self):
        """A fresh TrainState, created directly in its shardings."""
        return ts.create_train_state(self.model, self.optimizer, self.mesh, self.rules, self.seed)


def build_state_and_step(cfg: ml_collections.ConfigDict, mesh, *, loss_name: Optional[str] = None) -> Parts:
    """Model, optimizer, the jitted train and eval steps and the abstract state for `mesh`."""
    loss_name = loss_name or cfg.loss
    model_config = experiment.model_config(cfg)
    model = Transformer(model_config)
    opt_cfg = experiment.optimizer_config(cfg)
    optimizer, schedule = optim.make_optimizer(opt_cfg), optim.make_schedule(opt_cfg)
    rules = sharding.logical_rules(cfg.get("sharding_rules"))
    loss_cfg = experiment.loss_config(cfg)
    loss_fn = ts.bind_loss(loss_name, model, loss_cfg)
    step = ts.make_train_step(model, loss_fn, optimizer, mesh, rules, microbatches=cfg.microbatches,
                              bias_update_rate=cfg.moe.bias_update_rate, schedule=schedule,
                              loss_name=loss_name, loss_cfg=loss_cfg)
    abstract = ts.abstract_train_state(model, optimizer, mesh, rules)
    params_sharding = jax.tree.map(lambda x: x.sharding, abstract.params)
    return Parts(model_config=model_config, model=model, optimizer=optimizer, schedule=schedule,
                 loss_fn=loss_fn, mesh=mesh, rules=rules, abstract_state=abstract, train_step=step,
                 # Evaluation never drops tokens (DeepSeek-V2 §2.2.4): the dropless twin of the model.
                 eval_step=make_eval_step(ts.bind_loss(loss_name, inference_model(model), loss_cfg),
                                          mesh, rules, params_sharding), seed=cfg.seed)


def make_eval_step(loss_fn: Callable, mesh, rules, params_sharding) -> Callable:
    """(params, global batch) -> the loss's metrics (a forward pass, no update)."""
    def evaluate(params, batch):
        _, metrics = loss_fn(params, batch, jax.random.key(0))
        return metrics

    jitted = jax.jit(evaluate, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                     out_shardings=sharding.replicated(mesh))

    def step(params, batch):
        # The model's logical constraints and expert-parallel shard_map read the ambient mesh
        # and rules, as in the train step.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(params, batch)

    return step


# ----- data ------------------------------------------------------------------------------------

def make_data_source(cfg: ml_collections.ConfigDict, split: str = "train"):
    """The Grain source of `cfg.data` for split "train" or "heldout" (None: no eval data)."""
    d, style = cfg.data, ("sft" if cfg.loss == "sft" else "text")
    if d.kind == "synthetic":
        # The held-out split never shares a problem with train (synthetic.py); a tenth the size.
        n = d.num_problems if split == "train" else max(d.num_problems // 10, 64)
        task = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get("task", {}).items()}
        return sources.SyntheticSource(n=n, split=split, seed=cfg.seed, style=style, **task)
    if d.kind == "mixture":
        return sources.make_source({"kind": "mixture", **d.mixture.to_dict()}) if split == "train" else None
    path = d.path if split == "train" else d.get("eval_path", "")
    if not path:
        return None
    if cfg.loss in ("sft", "dpo") and d.kind in ("jsonl", "parquet"):
        return post_train.user_source(cfg, path)  # {"messages"} | {"prompt", "response"} | DPO pairs
    spec = {"kind": d.kind, "paths": path}
    if d.kind != "text":  # plain text has no malformed rows
        spec["on_error"] = d.get("on_error", "skip")
    if cfg.loss == "sft" and d.kind != "text":
        spec["fields"] = ("prompt", "response")
    return sources.make_source(spec)


def build_data(cfg: ml_collections.ConfigDict, split: str = "train", *, model_vocab: Optional[int] = None):
    """This host's DataPipeline for `split` (None when the config has no such data)."""
    if cfg.loss not in DATA_LOSSES:
        raise ConfigError(f"loss={cfg.loss!r}: the data pipeline of cfg.data feeds {DATA_LOSSES}; "
                          "other objectives bring their own batches (build_state_and_step + global_batch).")
    source = make_data_source(cfg, split)
    if source is None:
        return None
    make = data_pipeline.make_sft_dataset if cfg.loss == "sft" else data_pipeline.make_pretrain_dataset
    options = {"overlong": cfg.data.overlong}
    if cfg.loss in ("sft", "dpo"):
        options = {"chat_template": post_train.chat_template(cfg), **(options if cfg.loss == "sft" else {})}
        make = data_pipeline.make_sft_dataset if cfg.loss == "sft" else data_pipeline.make_dpo_dataset
    # The whole global batch on every process (module docstring: process-count independent).
    pipe = make(source, cfg.data.tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                seed=cfg.seed, **options)
    if model_vocab is not None and pipe.tokenizer.vocab_size > model_vocab:
        raise ConfigError(f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary "
                          f"({pipe.tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r}); "
                          f"set model.vocab_size >= {pipe.tokenizer.vocab_size}")
    return pipe


def global_batch(host_batch: dict, mesh) -> dict:
    """The global batch (the same numpy arrays on every process) -> arrays split over the
    batch axes of `mesh`; each device copies only its own rows."""
    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_callback(v.shape, sharding.batch_sharding(mesh, v.ndim),
                                              lambda index, v=v: v[index])
    return out


# ----- metrics helpers -------------------------------------------------------------------------

def step_metrics(metrics: dict) -> dict:
    """Host copies of a step's metrics, with expert-load statistics derived from the counts."""
    host = jax.device_get(metrics)
    out = {k: v for k, v in host.items() if np.ndim(v) == 0}
    if EXPERT_COUNTS in host:
        out.update(expert_load_stats(host[EXPERT_COUNTS], dropped=host.get("moe/dropped")))
    return out


def evaluate(parts: Parts, params, pipe, num_batches: int) -> dict:
    """Token-weighted means of the loss metrics over the first `num_batches` held-out batches.

    A fresh iterator each time, so every evaluation scores the same batches.
    """
    totals, weight = {}, 0.0
    counts = ("denominator", "tokens", "rows")
    it = iter(pipe.dataset)
    for _ in range(num_batches):
        m = jax.device_get(parts.eval_step(params, global_batch(next(it), parts.mesh)))
        w = float(m.get("tokens", 1.0))
        weight += w
        for k, v in m.items():
            if np.ndim(v) == 0:
                totals[k] = totals.get(k, 0.0) + float(v) * (1.0 if k in counts else w)
    return {f"eval/{k}": v if k in counts else v / max(weight, 1.0) for k, v in totals.items()}


class _StopOnSignal:
    """Turns SIGTERM into a flag the loop checks before each step (then: save, exit 0).

    Only in single-process runs: with jax.distributed, JAX's preemption service catches
    SIGTERM and every process learns of it at the same step via `reached_preemption`.
    """

    def __init__(self):
        self.signum = None
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self._previous = None
        return self

    def _handle(self, signum, frame):
        del frame
        self.signum = signum

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _progress_bar(cfg, start: int):
    """tqdm on a terminal; None (plain log lines instead, `_log_line`) under nohup, SLURM, CI."""
    if not (cfg.progress and jax.process_index() == 0 and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.total_steps, initial=start, unit="step", dynamic_ncols=True)


def _log_line(step: int, total: int, record: dict, seconds_per_step: Optional[float]) -> None:
    """One plain progress line: step, loss, lr, tokens/s, ETA."""
    parts = [f"step {step}/{total}"]
    for key, name, fmt in (("loss", "loss", ".4f"), ("learning_rate", "lr", ".3g"),
                           ("tokens_per_s", "tokens/s", ",.0f"), ("eval/loss", "eval_loss", ".4f")):
        if key in record:
            parts.append(f"{name} {record[key]:{fmt}}")
    if seconds_per_step:
        eta = int(seconds_per_step * (total - step))
        parts.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    log.info("  ".join(parts))


_PEER_ERRORS = ("gloo", "connection reset", "connection refused", "heartbeat", "unavailable", "socket closed",
                "broken pipe", "peer")


def _peer_lost(e: Exception) -> bool:
    return jax.process_count() > 1 and any(p in str(e).lower() for p in _PEER_ERRORS)


# ----- the loop --------------------------------------------------------------------------------

def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Every stage from one entry (`python -m deepseek_jax.train`, experiments/r1_pipeline.py):
    `loss=grpo` runs the GRPO loop (rl/grpo.py) from `init_from`, anything else `train`."""
    if cfg.loss == "grpo":
        from deepseek_jax.rl import grpo

        return grpo.run(cfg, workdir, init_from=cfg.get("init_from") or None)
    return train(cfg, workdir)


def check_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses (ConfigError, nothing written) to resume checkpoints of a different model.

    Other changed keys (total_steps, the learning rate, ...) are allowed and logged at
    resume time; a changed `model.*` (or a switch to or from GRPO, whose checkpoints hold
    a reference policy too) cannot load the saved state.
    """
    if not loading.complete_steps(workdir) or not os.path.isfile(os.path.join(workdir, "config.json")):
        return
    try:
        saved = json.loads(open(os.path.join(workdir, "config.json")).read())
    except (OSError, ValueError):
        return  # unreadable: the restore itself will say what is wrong
    old, new = _flat(saved), _flat(json.loads(cfg.to_json_best_effort()))
    old.setdefault("model.scan_layers", False)  # saved before the key existed: per-layer checkpoints
    keys = sorted(k for k in old.keys() | new.keys() if k.startswith("model.") and old.get(k) != new.get(k))
    if (old.get("loss") == "grpo") != (cfg.loss == "grpo"):
        keys.append("loss")
    if keys:
        diffs = "; ".join(f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in keys)
        raise ConfigError(f"refusing to resume {workdir}: its checkpoints are of another model ({diffs}). "
                          "Drop those overrides to resume, or pass a new --workdir (nothing was changed).")


def _show(v) -> str:
    return "(unset)" if v is None else json.dumps(v)


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """WORKDIR/config.json (process 0), once the run has started: readers rebuild the model from it."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `cfg` in `workdir`, resuming from its newest readable checkpoint.

    Nothing is written to `workdir` until the config, the workdir's checkpoints, the data
    and the initial state have all been checked and built (a refused or failed start leaves
    no trace). Returns {"step": last step, "preempted": bool, **last logged metrics}.
    """
    # --- devices, config and workdir (read-only checks) ---
    log.info("deepseek_jax.train: %s", distributed.describe())
    cfg = post_train.resolve_init_from(cfg)  # init_from's model config and tokenizer
    sizes = validate_config(cfg)
    check_workdir(cfg, workdir)

    # --- mesh, model, state shardings and the compiled step ---
    mesh = build_mesh(cfg)
    log.info("mesh %s", sizes)
    parts = build_state_and_step(cfg, mesh)

    # --- input ---
    train_pipe = build_data(cfg, "train", model_vocab=parts.model_config.vocab_size)
    eval_pipe = build_data(cfg, "heldout") if cfg.eval_every else None
    if cfg.eval_every and eval_pipe is None:
        log.warning("eval_every=%d but data.kind=%r has no held-out data (set data.eval_path); "
                    "evaluation is off", cfg.eval_every, cfg.data.kind)
    data_iter = iter(train_pipe.dataset)
    log.info("data: %s", describe_data(cfg, train_pipe))
    for s in train_pipe.stats.sources:
        for example in s.examples:
            log.warning("data %s: %s", s.name, example)

    # From here on SIGTERM means: save a checkpoint at the step reached and exit 0.
    with _StopOnSignal() as stop:
        # --- checkpoint: restore or initialise ---
        restored = None
        if loading.complete_steps(workdir) or os.path.isdir(os.path.join(workdir, "checkpoints")):
            ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
            restored = ckpt.restore(parts.abstract_state, data_iterator=data_iter)
        if restored is not None:
            state = restored.state
            log.info("resumed from %s", ckpt.step_dir(restored.step))
            _warn_config_changes(restored.config, cfg)
        else:
            if cfg.get("init_from"):  # e.g. SFT starting from a pretraining run's weights
                params = warm_start.load_params(cfg.init_from, mesh)
                state = warm_start.state_from_params(parts, post_train.fit_params(params, parts.abstract_state.params))
                log.info("initialised from the params of %s", cfg.init_from)
            else:
                state = parts.init_state()
                log.info("initialised a new model (seed %d)", cfg.seed)
        if cfg.loss == "dpo":  # every batch gets the reference policy's log-probs
            parts = post_train.with_dpo_reference(cfg, parts, state, resumed=restored is not None)
        # The start succeeded: from here on the workdir is written.
        write_config(cfg, workdir)
        if restored is None:
            ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
        writer = MetricsWriter(workdir, resume_step=int(restored.step) if restored is not None else None)
        if restored is None and jax.process_index() == 0:
            row = next(iter(train_pipe.dataset))  # a look at the data, without moving data_iter
            text = train_pipe.tokenizer.decode(row["tokens"][0][row["segment_ids"][0] == 1].tolist())
            writer.write_text(0, "data/sample", text)

        # --- update steps, evals, logs and checkpoints ---
        failed = None
        try:
            state, step, last, preempted = _loop(cfg, parts, state, data_iter, train_pipe, eval_pipe,
                                                 ckpt, writer, stop)
            # --- final checkpoint (also the preemption one) ---
            ckpt.save(step, state, data_iterator=data_iter, config=cfg, force=True)
            ckpt.wait()
        except (SaveFailed, PeerLost) as e:
            failed = e
            raise
        finally:
            writer.close()
            # After a failed save or a lost peer, closing would wait on the broken save or on
            # the missing process: the caller exits instead (cli.py).
            if failed is None:
                ckpt.close()
    log.info("%s at step %d; checkpoints in %s", "stopped" if preempted else "finished", step, ckpt.directory)
    if cfg.get("export_hf") and not preempted:
        post_train.export_hf(cfg, parts.model, state.params, cfg.export_hf)
    return {**last, "step": step, "preempted": preempted}


def describe_data(cfg: ml_collections.ConfigDict, pipe) -> str:
    """The start-up line about the input: what is read and how much of it (the pipeline's
    running counters are all zero before the first batch, so they are not shown here)."""
    d = cfg.data
    if d.kind == "synthetic":
        what = f"synthetic, {d.num_problems} problems ({d.task.get('task', 'mixed')})"
    else:
        kept = sum(s.rows_kept for s in pipe.stats.sources)
        skipped = sum(s.malformed_skipped + s.empty_skipped for s in pipe.stats.sources)
        what = f"{d.kind} {d.path or ''}".rstrip() + f", {kept} records" + (f" ({skipped} skipped)" if skipped else "")
    return (f"{what}; tokenizer {d.tokenizer} ({pipe.tokenizer.vocab_size} ids); "
            f"batches of {d.batch_size} x {d.seq_len} tokens")


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _warn_config_changes(saved: Optional[dict], cfg) -> None:
    """Resuming with a changed config is allowed (e.g. more total_steps), but said out loud."""
    if saved is None:
        return
    old, new = _flat(saved), _flat(json.loads(cfg.to_json_best_effort()))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        log.warning("config differs from the checkpoint's in %s",
                    ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))


def _throughput_meter(cfg, parts):
    """(tokens per step, training FLOPs per token, peak FLOP/s of all devices)."""
    flops_per_token = model_flops_per_token(parts.model_config, cfg.data.seq_len)
    peak = cfg.get("peak_flops", 0.0) * jax.device_count()  # optional: per-device peak FLOP/s
    if not peak:
        dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        peak = measure_peak_flops(jax.local_devices(), dtype) * jax.process_count()
    log.info("model FLOPs/token %.3g, peak %.3g FLOP/s over %d devices", flops_per_token, peak,
             jax.device_count())
    return cfg.data.batch_size * cfg.data.seq_len, flops_per_token, peak


def _loop(cfg, parts, state, data_iter, train_pipe, eval_pipe, ckpt, writer, stop):
    """Steps from state.step to cfg.total_steps (or a stop request); returns
    (state, step, last logged record, preempted)."""
    tokens_per_step, flops_per_token, peak = _throughput_meter(cfg, parts)
    step = int(jax.device_get(state.step))
    last, preempted = {}, False
    bar = _progress_bar(cfg, step)
    window_start, window_steps, seconds_per_step = None, 0, None
    try:
        while step < cfg.total_steps:
            # Checked before each step (the first too: the signal may come while compiling).
            if stop.signum is not None or ckpt.reached_preemption(step):
                log.warning("stop requested (%s) at step %d: saving a checkpoint and exiting",
                            "SIGTERM" if stop.signum is not None else "preemption", step)
                preempted = True
                break
            batch = global_batch(next(data_iter), parts.mesh)
            if window_start is None and jax.process_count() > 1:
                # Compile before the first collective and meet the other processes here.
                parts.train_step.lower(state, batch).compile()
                distributed.barrier("train_step_compiled")
            state, metrics = parts.train_step(state, batch)
            if window_start is None or step + 1 == cfg.total_steps or (step + 1) % cfg.log_every == 0:
                jax.block_until_ready(metrics)
            step += 1
            window_steps += 1
            if window_start is None:  # the first step includes compilation: time from its end
                window_start, window_steps = time.perf_counter(), 0

            record = {}
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                record = step_metrics(metrics)
                now = time.perf_counter()
                seconds_per_step = None
                if window_steps:
                    seconds_per_step = (now - window_start) / window_steps
                    record["tokens_per_s"] = tokens_per_step * window_steps / (now - window_start)
                    record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
                window_start, window_steps = now, 0
                record.update(train_pipe.stats.as_dict())
                if EXPERT_COUNTS in metrics:
                    writer.write_expert_load(step, jax.device_get(metrics[EXPERT_COUNTS]))
            if eval_pipe is not None and (step % cfg.eval_every == 0 or step == cfg.total_steps):
                record.update(evaluate(parts, state.params, eval_pipe, cfg.eval_batches))
                window_start = time.perf_counter()  # keep evaluation out of tokens_per_s
            if record:
                last = writer.write(step, record)
                if bar is not None and "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                elif bar is None and jax.process_index() == 0 and "loss" in record:
                    _log_line(step, cfg.total_steps, record, seconds_per_step)
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                ckpt.save(step, state, data_iterator=data_iter, config=cfg)
    except (PeerLost, SaveFailed):
        raise
    except Exception as e:  # noqa: BLE001 - only a lost peer is turned into PeerLost
        # Whichever collective meets the dead peer first (the step, a metrics gather, the
        # checkpoint's) raises: the same one-line message and exit code for all of them.
        if not _peer_lost(e):
            raise
        good = ckpt.latest_good()
        raise PeerLost(
            f"lost contact with another process after step {step} "
            f"({str(e).strip().splitlines()[0][:200]}). Last good checkpoint: "
            f"{good or 'none'}. Restart every process with the same command to resume.") from e
    finally:
        if bar is not None:
            bar.close()
    return state, step, last, preempted
