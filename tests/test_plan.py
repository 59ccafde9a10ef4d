"""`deepseek_jax.plan` on a small config and 8 CPU devices: its byte counts against the real
sharded train state, its all-reduce bytes against the gradients' bytes, the mesh rule, and the
HLO reader on a hand-made module."""
import math

import jax
import numpy as np
import pytest

from deepseek_jax import experiment, hlo_stats, planning, sharding, trainer
from deepseek_jax.config import ConfigError


def _small(mesh, **model):
    cfg = experiment.load_config("configs/tiny_v3.py:dense")
    cfg.model.update(dict(num_hidden_layers=1, num_mtp_layers=0, **model))
    cfg.data.seq_len, cfg.data.batch_size, cfg.microbatches = 16, 8, 1
    cfg.mesh.update(mesh)
    return cfg


def _device_bytes(tree) -> int:
    """Bytes device 0 really holds of a tree of sharded arrays."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def test_plan_bytes_equal_real_state_and_dp_allreduce_equals_grads():
    cfg = _small(dict(data=-1, fsdp=1, expert=1, tensor=1))
    r = planning.plan(cfg, 8)
    assert r["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1} and r["fits"]
    assert set(r) >= {"devices", "mesh", "fits", "hbm_bytes", "per_device_bytes", "collective_bytes",
                      "flops_per_device", "compile_s", "est_step_s", "est_mfu"}
    parts = trainer.build_state_and_step(cfg, sharding.make_mesh(r["mesh"]))
    state = parts.init_state()
    assert r["per_device_bytes"]["params"] == _device_bytes(state.params)
    assert r["per_device_bytes"]["optimizer"] == _device_bytes(state.opt_state)
    # Pure data parallelism: the float32 gradients are all-reduced once per step, plus a few
    # scalar metrics and counts; nothing else moves.
    grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
    ar = r["collective_bytes"]["all_reduce"]
    assert grad_bytes <= ar <= grad_bytes + 4096, (ar, grad_bytes)
    assert r["collective_bytes"]["all_to_all"] == 0
    # The compiled dot FLOPs are those of the model (6 N per token, + attention) within 25%.
    model_flops = r["details"]["model_flops_per_device"]
    assert 0.75 * model_flops <= r["flops_per_device"] <= 1.25 * model_flops


def test_plan_fsdp_bytes_equal_real_sharded_state():
    cfg = _small(dict(data=1, fsdp=-1, expert=1, tensor=2))
    r = planning.plan(cfg, 8)
    assert r["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    state = trainer.build_state_and_step(cfg, sharding.make_mesh(r["mesh"])).init_state()
    assert r["per_device_bytes"]["params"] == _device_bytes(state.params)
    assert r["per_device_bytes"]["optimizer"] == _device_bytes(state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert r["per_device_bytes"]["params"] < total / 2  # really sharded
    assert r["collective_bytes"]["all_gather"] > 0 or r["collective_bytes"]["reduce_scatter"] > 0


def test_choose_mesh_rule():
    cfg = experiment.load_config("configs/deepseek_v3.py")  # expert=64, fsdp=-1
    assert planning.choose_mesh(cfg, 256) == ({"data": 1, "fsdp": 4, "expert": 64, "tensor": 1}, None)
    sizes, note = planning.choose_mesh(cfg, 8)  # 64-way expert parallelism cannot fit
    assert sizes == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1} and "does not fit" in note
    assert planning.choose_microbatches(15360, 60, 8) == 60
    with pytest.raises(ConfigError, match="data.batch_size=12"):
        planning.choose_microbatches(12, 4, 8)  # 12 rows never split evenly over 8 devices
    assert planning.choose_microbatches(48, 4, 8) == 3


def test_hlo_reader_counts_loops_and_groups():
    text = """HloModule m

%body (p: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %p = (s32[], f32[64,32]{1,0}) parameter(0)
  %x = f32[64,32]{1,0} get-tuple-element(%p), index=1
  %w = f32[32,32]{1,0} constant({...})
  %d = f32[64,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = f32[64,32]{1,0} all-reduce(%d), channel_id=1, replica_groups=[2,8]<=[16], to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[64,32])) -> pred[] {
  %p = (s32[], f32[64,32]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[64,32]) -> f32[64,32] {
  %a = f32[64,32]{1,0} parameter(0)
  %ag = f32[128,32]{1,0} all-gather(%a), channel_id=2, replica_groups={{0,8},{1,9}}, dimensions={0}
  %z = s32[] constant(0)
  %init = (s32[], f32[64,32]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[64,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[64,32]{1,0} get-tuple-element(%w), index=1
}
"""
    out = hlo_stats.analyze(text, 16, devices_per_node=8)
    assert out["flops"] == 5 * 2 * 64 * 32 * 32
    by_kind = {c.kind: c for c in out["collectives"]}
    ar, ag = by_kind["all-reduce"], by_kind["all-gather"]
    assert (ar.bytes, ar.count, ar.group_size, ar.cross_node) == (64 * 32 * 4, 5, 8, False)
    assert (ag.bytes, ag.count, ag.group_size, ag.cross_node) == (128 * 32 * 4, 1, 2, True)
    assert hlo_stats.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert math.isclose(planning.roofline(0, 0, [ar], 0)["nvlink_s"],
                        5 * 64 * 32 * 4 * 2 * 7 / 8 / planning.ASSUMPTIONS["nvlink_bytes_per_s"])
    np.testing.assert_allclose(planning.roofline(989e12, 0, [], 989e12 / 2)["est_mfu"], 0.5)
