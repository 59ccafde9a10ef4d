"""Meshes, rules and sharded parameters: every parameter of tiny_v3 lands where its logical
axes say, mesh sizes resolve and fail clearly, and mesh-incompatible MoE configs are refused.

Oracle for placements: the rule table read directly from the parameters' logical names
(`nn.LogicallyPartitioned.names`), with a dimension replicated when the mesh axes do not
divide it, compared with the `.sharding` of the arrays `sharding.init_params` returns.
"""
import dataclasses
import math
import os

import flax.linen as nn
import jax
import pytest

from deepseek_jax import experiment, sharding
from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.model import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _norm(entry):
    if isinstance(entry, (tuple, list)):
        return tuple(entry) if len(entry) != 1 else entry[0]
    return entry


def _expected_spec(names, shape, mesh, rules):
    table = dict(rules)
    out = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        size = 1
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            size *= mesh.shape[a] if a is not None else 1
        out.append(_norm(axes) if axes is not None and dim % size == 0 else None)
    return out


def test_tiny_v3_params_are_sharded_as_declared():
    # One mesh using fsdp, expert and tensor at once (each init compiles the whole model).
    mesh_cfg = dict(fsdp=2, expert=2, tensor=2)
    cfg = experiment.load_config(os.path.join(REPO, "configs", "tiny_v3.py"))
    model = Transformer(experiment.model_config(cfg))
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.logical_rules()
    params = sharding.init_params(model, jax.random.key(0), mesh, rules)
    boxed = sharding.abstract_params(model)
    flat_boxed = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    flat_params = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0])
    assert len(flat_boxed) == len(flat_params) > 20
    sharded_over = set()
    for path, box in flat_boxed:
        key = jax.tree_util.keystr(path)
        assert isinstance(box, nn.LogicallyPartitioned), f"{key} has no logical axes"
        arr = flat_params[key]
        expected = _expected_spec(box.names, arr.shape, mesh, rules)
        actual = [_norm(e) for e in arr.sharding.spec] + [None] * (arr.ndim - len(arr.sharding.spec))
        assert actual == expected, (key, box.names, arr.shape, actual, expected)
        assert arr.sharding.mesh.shape == mesh.shape
        sharded_over.update(a for e in actual if e is not None for a in (e if isinstance(e, tuple) else (e,)))
    assert "expert" in sharded_over  # the routed experts really are split


def _per_device_split(model, mesh, rules):
    """{param path: (elements, elements per device)} from the shardings, nothing allocated."""
    abstract = nn.meta.unbox(sharding.abstract_params(model))
    shardings = sharding.param_shardings(model, mesh, rules)
    out = {}
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(shardings)):
        out[jax.tree_util.keystr(path)] = (math.prod(x.shape), math.prod(sh.shard_shape(x.shape)))
    return out


def test_zero3_over_the_whole_mesh_splits_every_weight_matrix_over_all_devices():
    """configs/deepseek_v3.py's rules (embed, q_lora, kv_lora -> fsdp x expert) on tiny_v3 over
    fsdp 2 x expert 4: every weight matrix, the routed experts (expert x fsdp) and MLA's q_b / kv_b
    projections included, holds 1/8 of its elements per device; only vectors (norm scales, the
    router bias) stay whole. Under the default rules q_b_proj is replicated (the 64x of V3)."""
    cfg = experiment.load_config(os.path.join(REPO, "configs", "tiny_v3.py"))
    v3_rules = experiment.load_config(os.path.join(REPO, "configs", "deepseek_v3.py")).sharding_rules
    model = Transformer(experiment.model_config(cfg))
    mesh = sharding.make_mesh(dict(fsdp=2, expert=4))
    split = _per_device_split(model, mesh, sharding.logical_rules(v3_rules))
    matrices = {k: v for k, v in split.items() if "scale" not in k and "bias" not in k}
    assert len(matrices) > 20 and any("up_proj" in k and "shared" not in k for k in matrices)
    for key, (full, per_device) in matrices.items():
        assert per_device * 8 == full, (key, full, per_device)
    rules = sharding.logical_rules(v3_rules)
    specs = {jax.tree_util.keystr(p): sh.spec
             for p, sh in jax.tree_util.tree_flatten_with_path(sharding.param_shardings(model, mesh, rules))[0]}
    assert specs["['layers_1']['mlp']['up_proj']"][:2] == ("expert", "fsdp")  # experts stay expert-parallel
    q_b = "['layers_0']['attn']['q_b_proj']['kernel']"
    default = _per_device_split(model, mesh, sharding.logical_rules())
    assert default[q_b][0] == default[q_b][1]  # replicated over all 8 devices
    # A dimension that fsdp x expert does not divide falls back to fsdp alone (q_lora 36 = 2 x 18).
    model36 = Transformer(experiment.model_config(cfg).replace(q_lora_rank=36))
    full, per_device = _per_device_split(model36, mesh, sharding.logical_rules(v3_rules))[q_b]
    assert per_device * 2 == full


def test_mesh_shape_resolves_minus_one_and_rejects_bad_products():
    assert sharding.mesh_shape({"data": -1}, 8) == dict(data=8, fsdp=1, expert=1, tensor=1)
    assert sharding.mesh_shape({"data": -1, "expert": 4}, 8) == dict(data=2, fsdp=1, expert=4, tensor=1)
    assert sharding.mesh_shape({"fsdp": 2, "expert": 4}, 8) == dict(data=1, fsdp=2, expert=4, tensor=1)
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ConfigError, match="does not divide"):
        sharding.mesh_shape({"data": -1, "expert": 3}, 8)
    with pytest.raises(ConfigError, match="8 are available"):
        sharding.mesh_shape({"data": 2, "expert": 2}, 8)
    with pytest.raises(ConfigError, match="positive size"):
        sharding.mesh_shape({"data": 0}, 8)
    with pytest.raises(ConfigError, match="unknown axis"):
        sharding.mesh_shape({"pipeline": 2}, 8)
    mesh = sharding.make_mesh({"data": -1, "expert": 4})
    assert dict(mesh.shape) == dict(data=2, fsdp=1, expert=4, tensor=1)


MOE = ModelConfig(n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2)


def test_validate_for_mesh_names_the_fix():
    sharding.validate_for_mesh(MOE, {"expert": 4})  # whole groups per device
    sharding.validate_for_mesh(MOE, {"expert": 8})  # each group on two devices
    divisors = r"mesh.expert=3 does not divide model.n_routed_experts=16.*\[1, 2, 4, 8, 16\]"
    with pytest.raises(ConfigError, match=divisors):
        sharding.validate_for_mesh(MOE.replace(n_group=1, topk_group=1), {"expert": 3})
    with pytest.raises(ConfigError, match=r"n_group=6 .*mesh.expert=4.*mesh.expert=2"):
        sharding.validate_for_mesh(MOE.replace(n_routed_experts=24, n_group=6), {"expert": 4})
    bad = dataclasses.replace(MOE)
    object.__setattr__(bad, "capacity_factor", 0.0)  # ModelConfig itself refuses this too
    with pytest.raises(ConfigError, match="capacity_factor=0.0: must be > 0"):
        sharding.validate_for_mesh(bad, sharding.make_mesh({"expert": 4, "data": -1}))


def test_moe_layer_refuses_an_incompatible_mesh_before_compiling():
    from deepseek_jax import moe
    import jax.numpy as jnp

    cfg = ModelConfig(hidden_size=16, n_routed_experts=12, num_experts_per_tok=2, moe_intermediate_size=8)
    x = jnp.ones((8, 2, 16))
    params = nn.meta.unbox(jax.eval_shape(moe.MoE(cfg).init, jax.random.key(0), x)["params"])
    with jax.set_mesh(sharding.make_mesh({"expert": 8})):
        with pytest.raises(ConfigError, match="mesh.expert=8 does not divide model.n_routed_experts=12"):
            jax.jit(moe.MoE(cfg).apply).trace({"params": params}, x)
