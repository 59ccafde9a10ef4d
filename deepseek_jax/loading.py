"""The one way to read a model's weights, for every reader (generate, convert, init_from, notebooks).

    loaded = loading.load("runs/demo/grpo")                  # newest complete checkpoint
    loaded = loading.load("runs/demo/sft", step=100)          # a given step
    loaded = loading.load("path/to/DeepSeek-V2-Lite")         # a Hugging Face directory
    loaded = loading.load("ckpt/v3", mesh=mesh)               # `convert --to` output, sharded on mesh
    loaded.model, loaded.params, loaded.tokenizer, loaded.config, loaded.step

Sources (`detect`):
    workdir  a `python -m deepseek_jax.train` directory: config.json + checkpoints/<step>/state
             holding a TrainState; or a GRPO run's, whose state holds {"state", "ref_params"}
    hf       config.json + *.safetensors (hf.from_pretrained)
    orbax    model_config.json + params/ (convert.save_orbax)

Readers never write: a checkpoint is opened straight from its step directory with a
plain PyTreeCheckpointer, never through a CheckpointManager (which creates the directory,
removes `*.orbax-checkpoint-tmp` saves in progress and, in checkpoint.py, renames unreadable
steps). A training run writing beside a reader is therefore never disturbed. An unreadable
newest checkpoint falls back to the previous one with a warning, as the trainer does.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

log = logging.getLogger(__name__)

WORKDIR, HF, ORBAX = "workdir", "hf", "orbax"
COMMIT_MARKER = "_CHECKPOINT_METADATA"  # Orbax writes it when a step is complete


class LoadError(ValueError):
    """A path that is not a readable model source; the message names the path and the fix."""


@dataclasses.dataclass
class Loaded:
    model: Any  # Transformer
    params: Any  # float32 unless a dtype was asked for
    tokenizer: str  # the default tokenizer: "byte", or a tokenizer.json path / directory
    kind: str  # WORKDIR | HF | ORBAX
    path: str
    config: Optional[ml_collections.ConfigDict] = None  # the experiment config (workdirs only)
    step: Optional[int] = None  # the checkpoint's step (workdirs only)


def detect(path: str) -> str:
    """WORKDIR, HF or ORBAX from the files in `path` (LoadError if none fits)."""
    if not os.path.isdir(path):
        raise LoadError(f"{path!r} is not a directory: pass a training workdir, a Hugging Face "
                        "directory or an Orbax directory written by `python -m deepseek_jax.convert`")
    names = set(os.listdir(path))
    if "checkpoints" in names or _is_experiment_config(os.path.join(path, "config.json")):
        return WORKDIR
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return HF
    if "model_config.json" in names or "params" in names:
        return ORBAX
    raise LoadError(f"{path!r} holds none of: config.json + checkpoints/ (a training workdir), config.json + "
                    "*.safetensors (Hugging Face), model_config.json + params/ (deepseek_jax.convert --to)")


def _is_experiment_config(path: str) -> bool:
    """A trainer's config.json (an experiment ConfigDict), not a Hugging Face one."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "model" in d and "loss" in d


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise LoadError(f"{path} does not exist: {workdir!r} is not a training workdir "
                        "(python -m deepseek_jax.train writes config.json there)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def complete_steps(workdir: str) -> list[int]:
    """Steps with a committed checkpoint in `workdir/checkpoints`, oldest first (read-only)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir)
                  if d.isdigit() and os.path.exists(os.path.join(ckpt_dir, d, COMMIT_MARKER)))


def step_dir(workdir: str, step: Optional[int] = None) -> str:
    """The directory of checkpoint `step` (default: the newest complete one)."""
    steps = complete_steps(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not steps:
        raise LoadError(f"no complete checkpoint in {ckpt_dir}; train that run first")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise LoadError(f"step={step}: {ckpt_dir} has complete checkpoints at steps {steps}; pick one of them")
    return os.path.join(ckpt_dir, str(step))


def _placement(model, mesh, rules):
    """Per-parameter ShapeDtypeStructs with shardings: on `mesh` by `rules`, else one device."""
    import flax.linen as nn

    from deepseek_jax import sharding

    boxed = sharding.abstract_params(model)
    shapes = nn.meta.unbox(boxed)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    else:
        shardings = sharding.logical_to_shardings(boxed, mesh, rules or sharding.logical_rules())
    return shapes, shardings


def read_params(state_dir: str, target: Any) -> Any:
    """The params of one step's `state` item, trainer or GRPO layout, into `target`'s shardings."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    errors = []
    # Trainer checkpoints hold a TrainState; GRPO's hold {"state": TrainState, "ref_params"}.
    for item in ({"params": target}, {"state": {"params": target}}):
        try:
            restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))
        except (KeyError, ValueError, FileNotFoundError) as e:
            errors.append(e)
            continue
        params = restored["params"] if "params" in restored else restored["state"]["params"]
        # A partial restore of a path the checkpoint lacks hands the target back unread.
        if all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
            return params
        errors.append(KeyError(f"no 'params' at {list(item)}"))
    # Orbax's messages can carry the whole tree (tens of KB): keep the first lines.
    detail = str(errors[-1]).strip().splitlines()[0][:300] if errors else ""
    raise LoadError(f"could not read the parameters in {state_dir} ({type(errors[-1]).__name__}: {detail}); "
                    "is this checkpoint from this model config (WORKDIR/config.json)?")


def _cast(params, dtype):
    if dtype is None:
        return params
    from deepseek_jax.hf import _is_f32_leaf

    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if _is_f32_leaf(tuple(k.key for k in p)) or x.dtype == dtype else x.astype(dtype), params)


def load(path: str, *, step: Optional[int] = None, mesh=None, rules=None, dtype=None) -> Loaded:
    """Model and params from any source above; see the module docstring.

    mesh/rules: place the parameters on `mesh` (default: the first device). step: a
    workdir's checkpoint step (default: the newest complete, falling back past unreadable
    ones). dtype: cast the parameters (the router and its bias stay float32).
    """
    from deepseek_jax import convert, experiment, hf, sharding
    from deepseek_jax.model import Transformer

    kind = detect(path)
    if step is not None and kind != WORKDIR:
        raise LoadError(f"step={step}: only training workdirs hold several steps; {path!r} is a {kind} directory")
    if kind == HF:
        model = Transformer(hf.config_from_hf(json.load(open(os.path.join(path, "config.json")))))
        shardings = sharding.param_shardings(model, mesh, rules or sharding.logical_rules()) if mesh else None
        model, params = hf.from_pretrained(path, dtype=dtype or jnp.float32, shardings=shardings)
        tok = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else "byte"
        return Loaded(model, params, tok, kind, path)
    if kind == ORBAX:
        shardings = None
        if mesh is not None:
            with open(os.path.join(path, convert.CONFIG_FILE)) as f:
                from deepseek_jax.config import ModelConfig
                model = Transformer(ModelConfig.from_dict(json.load(f)))
            shardings = sharding.param_shardings(model, mesh, rules or sharding.logical_rules())
        model, params = convert.load_orbax(path, shardings=shardings, dtype=dtype)
        tok = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else "byte"
        return Loaded(model, params, tok, kind, path)

    cfg = saved_config(path)
    model = Transformer(experiment.model_config(cfg))
    shapes, shardings = _placement(model, mesh, rules or (sharding.logical_rules(cfg.get("sharding_rules"))
                                                          if mesh is not None else None))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    steps = [step] if step is not None else list(reversed(complete_steps(path)))
    if not steps:
        step_dir(path)  # raises the "no complete checkpoint" error
    first_error = None
    for s in steps:
        # Orbax refuses relative paths (`--config.init_from=runs/demo/pretrain` must work).
        state_dir = os.path.abspath(os.path.join(step_dir(path, s), "state"))
        try:
            params = read_params(state_dir, target)
        except LoadError as e:
            if step is not None:
                raise
            log.warning("checkpoint %s is unreadable; trying the previous one (%s)", state_dir, e)
            first_error = first_error or e
            continue
        tok = cfg.get("data", {}).get("tokenizer", "byte") or "byte"
        return Loaded(model, _cast(params, dtype), tok, WORKDIR, path, config=cfg, step=s)
    raise first_error
