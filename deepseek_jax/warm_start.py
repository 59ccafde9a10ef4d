"""Starting one run from another's weights (pretrain -> SFT -> GRPO -> ...).

`load_params(workdir, mesh)` reads only the parameters of the newest checkpoint in a
trainer (or GRPO) workdir, placed in their shardings on `mesh`, using the model config
saved beside it; the optimizer state is not read, so the two runs may use different
optimizers. `state_from_params(parts, params)` wraps them in a fresh TrainState.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from deepseek_jax import experiment, sharding
from deepseek_jax import train_step as ts
from deepseek_jax.model import Transformer


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a training workdir "
                                "(python -m deepseek_jax.train writes config.json there)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def latest_step_dir(workdir: str) -> str:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
    committed = [s for s in steps if os.path.exists(os.path.join(ckpt_dir, str(s), "_CHECKPOINT_METADATA"))]
    if not committed:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}; train that run first")
    return os.path.join(ckpt_dir, str(committed[-1]))


def load_params(workdir: str, mesh, rules=None) -> Any:
    """Float32 params of `workdir`'s newest checkpoint, sharded on `mesh` by `rules`."""
    cfg = saved_config(workdir)
    model = Transformer(experiment.model_config(cfg))
    rules = rules or sharding.logical_rules(cfg.get("sharding_rules"))
    boxed = sharding.abstract_params(model)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), sharding.logical_to_shardings(boxed, mesh, rules))
    # Orbax refuses relative paths (`--config.init_from=runs/demo/pretrain` must work).
    state_dir = os.path.abspath(os.path.join(latest_step_dir(workdir), "state"))
    checkpointer = ocp.PyTreeCheckpointer()
    # Trainer checkpoints hold a TrainState; GRPO's hold {"state": TrainState, "ref_params"}.
    errors = []
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
        errors.append(KeyError(f"no 'params' at {list(item)} in {state_dir}"))
    raise ValueError(f"could not read params from {state_dir}: {errors[-1]}") from errors[-1]


def state_from_params(parts, params, seed: Optional[int] = None) -> ts.TrainState:
    """A step-0 TrainState around `params` with a fresh optimizer state (trainer.Parts)."""
    shardings = jax.tree.map(lambda a: a.sharding, parts.abstract_state)
    opt_state = jax.jit(parts.optimizer.init, out_shardings=shardings.opt_state)(params)
    _, step_key = jax.random.split(jax.random.key(parts.seed if seed is None else seed))
    rep = sharding.replicated(parts.mesh)
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), rep)  # noqa: E731
    return ts.TrainState(step=zero(), params=params, opt_state=opt_state,
                         rng=jax.device_put(jax.random.key_data(step_key), rep), skipped=zero())
