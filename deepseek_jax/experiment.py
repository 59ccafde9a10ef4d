"""Experiment configs: the ml_collections ConfigDict every entry point takes.

A config file in `configs/` defines `get_config(arg: str | None) -> ConfigDict`, starting
from `default_config()` and changing what it needs. Entry points load it with
ml_collections' `config_flags` (`--config configs/tiny_v3.py:arg --config.total_steps=10`)
or with `load_config` from Python; `model_config(cfg)` turns the `model` section plus the
execution choices (`compute_dtype`, `moe.*`, `remat`) into the frozen `ModelConfig`
that model code receives (model code never sees the ConfigDict).

Fixed top-level keys (DESIGN.md contract): model, loss, total_steps, microbatches,
compute_dtype, seed, log_every, eval_every, checkpoint_every, progress,
mesh.{data,fsdp,expert,tensor}, moe.{dispatch,capacity_factor,routing_impl,
bias_update_rate}, optimizer.*, data.*; plus loss_config.* (losses.LossConfig fields).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from typing import Optional, Sequence

import ml_collections

from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.losses import LossConfig
from deepseek_jax.optim import OptimizerConfig


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with its default. Config files override a few."""
    c = ml_collections.ConfigDict()
    # Every ModelConfig field, unset (None) unless a config sets it: config_flags refuses keys the
    # ConfigDict lacks, so this is what lets `--config.model.FIELD=...` reach any field.
    c.model = model_defaults()
    c.loss = "pretrain"  # a name in losses.LOSSES
    c.loss_config = ml_collections.ConfigDict()  # LossConfig fields
    c.total_steps = 100
    c.microbatches = 1
    c.compute_dtype = "bfloat16"  # activations; parameters and optimizer state stay float32
    c.remat = "none"  # "none" | "full" | "dots"
    c.seed = 0
    c.log_every = 10
    c.eval_every = 0  # 0 = never
    c.eval_batches = 4
    c.checkpoint_every = 0  # 0 = only at the end (and on SIGTERM)
    c.keep_checkpoints = 3
    c.progress = True
    c.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = measure with a matmul at start
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    c.sharding_rules = ml_collections.ConfigDict()  # logical axis -> mesh axes overrides
    c.moe = ml_collections.ConfigDict(dict(
        dispatch="dropless", capacity_factor=1.25, routing_impl="auto", bias_update_rate=1e-3,
        capacity_policy="affinity",
        # Dropless expert-parallel buffers: None = the worst case; f = f x the balanced share,
        # overflow dropped and counted (ModelConfig.ep_buffer_factor).
        ep_buffer_factor=ml_collections.config_dict.placeholder(float)))
    # The schedule's length is always the top-level total_steps.
    c.optimizer = ml_collections.ConfigDict(
        {k: v for k, v in _dataclass_defaults(OptimizerConfig).items() if k != "total_steps"})
    c.data = ml_collections.ConfigDict(dict(
        kind="synthetic",  # "synthetic" (embedded tasks) | a source spec for data.sources
        path="", eval_path="", tokenizer="byte", seq_len=256, batch_size=8, overlong="truncate",
        on_error="skip",  # a malformed row in data.path: "skip" (counted, logged) | "raise"
        num_problems=20_000, mixture=ml_collections.ConfigDict(),
        # Conversations (data/chat.py): "auto" = the tokenizer's tokenizer_config.json chat_template,
        # "none" = concatenate the messages.
        chat_template="none",
        # Options of the embedded tasks (data.synthetic.make_problem): task, digits, ops, ...
        task=ml_collections.ConfigDict(dict(task="mixed"))))
    c.init_from = ""  # a workdir whose newest params start this run (warm_start.py)
    c.export_hf = ""  # write the final params here as a Hugging Face checkpoint (post_train.py)
    return c


# ModelConfig fields that come from execution keys (compute_dtype, remat, moe.*), not cfg.model.
EXECUTION_FIELDS = ("dtype", "remat", "moe_dispatch", "capacity_factor", "routing_impl", "capacity_policy",
                    "ep_buffer_factor")


def model_defaults() -> ml_collections.ConfigDict:
    """`default_config().model`: every ModelConfig field but the execution ones, unset.

    Unset = a typed placeholder (None), so config_flags accepts `--config.model.FIELD=...`
    for a field the config file does not set; `model_config` leaves the None ones out, so
    ModelConfig's own defaults apply, and the workdir check and `init_from` still see only
    the fields a config or the command line set. rope_scaling (a dict) is a plain None: set
    it in a config file. scan_layers keeps its value (listed before every field was).
    """
    hints = typing.get_type_hints(ModelConfig)
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(ModelConfig):
        if f.name in EXECUTION_FIELDS:
            continue
        kind = type(f.default) if f.default is not None else (int if int in typing.get_args(hints[f.name]) else None)
        out[f.name] = ml_collections.config_dict.placeholder(kind) if kind else None
    out.scan_layers = ModelConfig.scan_layers
    return out


def _dataclass_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen ModelConfig for `cfg`: its `model` section plus the execution choices."""
    fields = {k: v for k, v in cfg.model.to_dict().items() if v is not None}  # None = unset: the default
    fields.update(dtype=cfg.get("compute_dtype", fields.get("dtype", "float32")),
                  remat=cfg.get("remat", fields.get("remat", "none")))
    moe = cfg.get("moe")
    if moe is not None:
        fields.update(moe_dispatch=moe.dispatch, capacity_factor=moe.capacity_factor,
                      routing_impl=moe.routing_impl)
        if "capacity_policy" in moe:  # configs saved before the key existed keep the default
            fields.update(capacity_policy=moe.capacity_policy)
        if moe.get("ep_buffer_factor") is not None:
            fields.update(ep_buffer_factor=moe.ep_buffer_factor)
    return ModelConfig.from_dict(fields)


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    return _build(LossConfig, cfg.get("loss_config", {}), "loss_config")


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    fields = dict(cfg.optimizer.to_dict(), total_steps=cfg.total_steps)
    return _build(OptimizerConfig, fields, "optimizer")


def _build(cls, fields, section: str):
    fields = dict(fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else fields)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {unknown}; known: {sorted(names)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(**fields)


def load_config(spec: str, overrides: Optional[Sequence[str]] = None) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` and applies `key=value` overrides (dotted keys).

    The Python twin of `--config path.py:arg --config.key=value`, for notebooks and tests.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (from --config={spec!r}).")
    module_spec = importlib.util.spec_from_file_location(
        "_config_" + os.path.basename(path).removesuffix(".py"), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    for item in overrides or ():
        key, sep, value = item.removeprefix("--config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        _set_dotted(cfg, key, value)
    return cfg


def _set_dotted(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets cfg.a.b = value parsed as the type of the current value (like config_flags)."""
    import ast

    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string
    current = node.get(leaf)
    if isinstance(value, str) and (isinstance(current, bool) or (
            current is None and leaf in node and node.get_type(leaf) is bool)):  # an unset bool field
        value = text.lower() in ("1", "true", "yes")
    elif isinstance(current, float) and isinstance(value, int):
        value = float(value)
    node[leaf] = value
