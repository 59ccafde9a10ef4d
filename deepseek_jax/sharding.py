"""Meshes, logical-axis rules and parameters created already sharded.

Mesh axes (outermost first): data, fsdp, expert, tensor.
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  expert  routed experts split across devices (expert parallelism); these devices also
          take their own slice of the batch for attention and dense layers
  tensor  Megatron-style splitting of heads / MLP width / vocabulary

Model code names its dimensions logically (`embed`, `heads`, `q_lora`, `kv_lora`, `mlp`,
`expert`, `expert_embed`, `vocab`, `batch`, `length`, `norm`, `layers`); `DEFAULT_RULES` maps
them to mesh axes. A config can override single entries (`cfg.sharding_rules.mlp = None`).
A dimension's mesh axes must not be used by an earlier dimension of the same array (flax's
rule): the weights' `embed` can take ("fsdp", "expert") (ZeRO-3 over the whole mesh for the
non-expert weights, as configs/deepseek_v3.py does) because the routed experts name their
model dim `expert_embed`, and activations keep `batch` on those axes first.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("expert_embed", "fsdp"),  # the routed experts' model dim (their `expert` dim is split already)
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),
    ("layers", None),  # the leading axis of scanned layer stacks (ModelConfig.scan_layers)
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves a single -1 entry to the remaining devices; checks the product."""
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh: unknown axis {unknown}; the axes are {MESH_AXES}.")
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{a}={s}: use a positive size, or -1 for the remaining devices.")
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {free}; give the others explicit sizes.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh: the fixed axes {sizes} multiply to {fixed}, which does not "
                              f"divide the {num_devices} devices; mesh.{free[0]}=-1 cannot fill it.")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh: {sizes} has {math.prod(sizes.values())} devices but "
                          f"{num_devices} are available; make the product match, or set one axis to -1.")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes (data, fsdp, expert, tensor)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(dict(mesh_cfg), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from our annotations (Explicit is jax.make_mesh's
    # default in new JAX and turns every constraint into an assertion).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):  # topology-aware device order on GPU/TPU
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_rules(overrides: Optional[Mapping[str, Any]] = None) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with single entries replaced (values: axis name, list of names, None)."""
    rules = dict(DEFAULT_RULES)
    for name, value in dict(overrides or {}).items():
        if isinstance(value, list):
            value = tuple(value)
        for axis in (value if isinstance(value, tuple) else (value,)):
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"sharding_rules.{name}={value!r}: {axis!r} is not a mesh axis "
                                  f"{MESH_AXES}.")
        rules[name] = value
    return tuple(rules.items())


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh, name: str) -> P:
    """Splits each dimension over the longest leading part of its mesh axes that divides it
    ("fsdp" when ("fsdp", "expert") does not), replicating it when none does (tiny models on
    big meshes)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for i, (entry, dim) in enumerate(zip(entries, shape)):
        if dim % _axis_size(mesh, entry):
            names = entry if isinstance(entry, tuple) else (entry,)
            prefix = next((names[:k] for k in range(len(names) - 1, 0, -1)
                           if dim % _axis_size(mesh, names[:k]) == 0), None)
            entries[i] = None if prefix is None else (prefix if len(prefix) > 1 else prefix[0])
            log.warning("%s: dim %d of shape %s is not divisible by mesh axes %s (%d); %s.", name, i,
                        tuple(shape), entry, _axis_size(mesh, entry),
                        "replicating it" if prefix is None else f"splitting it over {entries[i]}")
    return P(*entries)


def logical_to_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` boxes (or abstract values)."""
    specs = nn.get_partition_spec(boxed_tree)  # logical names, boxes unwrapped
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed_tree))
    paths = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    flat_specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
    fitted = [NamedSharding(mesh, _fit(spec, shape, mesh, jax.tree_util.keystr(path)))
              for (path, shape), spec in zip(paths, flat_specs)]
    return jax.tree.unflatten(jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple)), fitted)


def abstract_params(model: nn.Module, batch: int = 1, length: int = 8):
    """Boxed ShapeDtypeStructs of the model's parameters; allocates nothing."""
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def param_shardings(model: nn.Module, mesh: Mesh, rules) -> Any:
    return logical_to_shardings(abstract_params(model), mesh, rules)


def init_params(model: nn.Module, rng: jax.Array, mesh: Mesh, rules) -> Any:
    """Float32 parameters created directly in their shardings (jitted init, out_shardings)."""
    shardings = param_shardings(model, mesh, rules)

    def init(key):
        tokens = jnp.zeros((1, 8), jnp.int32)
        return nn.meta.unbox(model.init(key, tokens)["params"])

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(init, out_shardings=shardings)(rng)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp x expert; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _mesh_sizes(mesh) -> dict[str, int]:
    if isinstance(mesh, Mapping):
        return {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    return {a: int(mesh.shape[a]) if a in mesh.axis_names else 1 for a in MESH_AXES}


def validate_for_mesh(model_config, mesh) -> None:
    """Rejects a ModelConfig the mesh cannot run, before compilation (ConfigError names the fix).

    `mesh`: a Mesh, an AbstractMesh or a dict of axis sizes (as `mesh_shape` returns).
    Expert parallelism needs n_routed_experts divisible by mesh.expert (each device holds
    E / expert experts), and group-limited routing needs the groups to line up with the
    devices: n_group a multiple of mesh.expert (whole groups per device: device-limited
    routing) or mesh.expert a multiple of n_group (each group on whole devices).
    """
    c = model_config
    if c.capacity_factor <= 0:
        raise ConfigError(f"moe.capacity_factor={c.capacity_factor}: must be > 0 (1.0 = exactly the "
                          "average load per expert; 1.25 is a common choice).")
    if not c.is_moe:
        return
    ep = _mesh_sizes(mesh)["expert"]
    E, G = c.n_routed_experts, c.n_group
    if E % ep:
        divisors = [d for d in range(1, E + 1) if E % d == 0]
        raise ConfigError(f"mesh.expert={ep} does not divide model.n_routed_experts={E}; set mesh.expert "
                          f"to one of {divisors} (move the other devices to mesh.data or mesh.fsdp).")
    if G > 1 and G % ep and ep % G:
        raise ConfigError(f"model.n_group={G} expert groups cannot be mapped onto mesh.expert={ep} devices; "
                          f"use a mesh.expert that divides n_group or is a multiple of it "
                          f"(e.g. mesh.expert={math.gcd(G, ep)}).")
