"""Starting one run from another's weights (pretrain -> SFT -> GRPO -> ...).

`load_params(path, mesh)` reads only the parameters (loading.py: the newest checkpoint of a
trainer or GRPO workdir, a Hugging Face directory or a `convert` Orbax directory), placed
in their shardings on `mesh`; the optimizer state is not read, so the two runs may use
different optimizers. `state_from_params(parts, params)` wraps them in a fresh TrainState.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from deepseek_jax import loading, sharding
from deepseek_jax import train_step as ts
from deepseek_jax.config import ConfigError


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    return loading.saved_config(workdir)


def latest_step_dir(workdir: str) -> str:
    """The newest complete checkpoint's directory (FileNotFoundError if there is none)."""
    try:
        return loading.step_dir(workdir)
    except loading.LoadError as e:
        raise FileNotFoundError(str(e)) from e


def load_params(path: str, mesh, rules=None, step: Optional[int] = None) -> Any:
    """Float32 params from any source `loading.load` reads (a trainer or GRPO workdir, a
    Hugging Face directory, a `convert` Orbax directory), sharded on `mesh` by `rules`."""
    return loading.load(path, step=step, mesh=mesh, rules=rules, dtype=jnp.float32).params


def state_from_params(parts, params, seed: Optional[int] = None) -> ts.TrainState:
    """A step-0 TrainState around `params` with a fresh optimizer state (trainer.Parts)."""
    want = jax.tree_util.tree_flatten_with_path(parts.abstract_state.params)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in want:
        if path not in got or tuple(got[path].shape) != tuple(leaf.shape):
            name = jax.tree_util.keystr(path)
            have = tuple(got[path].shape) if path in got else "missing"
            raise ConfigError(f"init_from: parameter {name} is {have} there but {tuple(leaf.shape)} in this "
                              "config's model; init_from must hold the same architecture (model.*)")
    shardings = jax.tree.map(lambda a: a.sharding, parts.abstract_state)
    opt_state = jax.jit(parts.optimizer.init, out_shardings=shardings.opt_state)(params)
    _, step_key = jax.random.split(jax.random.key(parts.seed if seed is None else seed))
    rep = sharding.replicated(parts.mesh)
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), rep)  # noqa: E731
    return ts.TrainState(step=zero(), params=params, opt_state=opt_state,
                         rng=jax.device_put(jax.random.key_data(step_key), rep), skipped=zero())
