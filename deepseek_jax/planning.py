"""Dry run of THE train step on N simulated devices: memory, FLOPs, collectives, a roofline.

`plan(cfg, devices)` builds the config's model, optimizer, loss and mesh, compiles the real
train step (train_step.make_train_step) ahead of time on abstract params, optimizer state
and batch (ShapeDtypeStructs carrying their shardings; nothing is allocated) and reads:

- per device bytes: params and optimizer state (their shard shapes), temporaries
  (`compiled.memory_analysis().temp_size_in_bytes`), total = arguments + outputs - aliased
  (donated state) + temporaries, against the HBM size ("fits");
- FLOPs per device and bytes per collective kind per step from the compiled HLO
  (hlo_stats.py: loops counted with their trip counts);
- a roofline step time on H200 nodes (ASSUMPTIONS): max(FLOPs / peak, HBM bytes / HBM
  bandwidth) + collective time, each collective charged to NVLink when all of its replica
  groups stay inside a node (consecutive device ids, mesh axes innermost = tensor first),
  else to the network; ring costs: all-reduce 2 (n-1)/n x bytes, the others (n-1)/n x bytes.
  No overlap of compute and communication is assumed (an upper bound on the step time).
  MFU = model FLOPs (inspect.model_stats: 6 x activated matmul params + attention, per
  token, times the step's tokens) / devices / (step time x peak).

Mesh rule when the config's mesh does not fit N devices (`choose_mesh`): tensor = gcd(config
tensor, N); expert = the largest divisor of gcd(config expert, N / tensor) that the model
accepts (sharding.validate_for_mesh); the remaining devices go to the config's -1 axis (fsdp
when none). Micro-batches: the config's, or the largest count <= it that splits the global
batch evenly over the data-parallel devices.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from deepseek_jax import experiment, hlo_stats, optim, sharding
from deepseek_jax import inspect as inspect_lib
from deepseek_jax import train_step as ts
from deepseek_jax.config import ConfigError
from deepseek_jax.model import Transformer

ASSUMPTIONS = {
    "peak_flops": 989e12,  # H200 dense bf16 per GPU
    "hbm_bytes_per_s": 4.8e12,
    "gpus_per_node": 8,
    "nvlink_bytes_per_s": 900e9,  # per GPU, inside a node
    "network_bytes_per_s": 400e9 / 8,  # 400 Gb/s per GPU between nodes
}


def choose_mesh(cfg: ml_collections.ConfigDict, devices: int) -> tuple[dict, Optional[str]]:
    """(mesh sizes, None) when the config's mesh fits `devices`, else (chosen sizes, why)."""
    mesh_cfg = dict(cfg.mesh)
    model_cfg = experiment.model_config(cfg)
    try:
        sizes = sharding.mesh_shape(mesh_cfg, devices)
        sharding.validate_for_mesh(model_cfg, sizes)
        return sizes, None
    except ConfigError as e:
        reason = str(e)
    free = [a for a, s in mesh_cfg.items() if s == -1]
    rest_axis = free[0] if free else "fsdp"
    tensor = math.gcd(max(int(mesh_cfg.get("tensor", 1)), 1), devices)
    expert = 1
    cap = math.gcd(max(int(mesh_cfg.get("expert", 1)), 1), devices // tensor)
    for e in sorted((d for d in range(1, cap + 1) if cap % d == 0), reverse=True):
        try:
            sharding.validate_for_mesh(model_cfg, {"expert": e})
            expert = e
            break
        except ConfigError:
            continue
    sizes = {a: 1 for a in sharding.MESH_AXES}
    sizes.update(tensor=tensor, expert=expert)
    sizes[rest_axis] = devices // (tensor * expert)
    return sizes, f"config mesh {mesh_cfg} does not fit {devices} devices ({reason}); chose {sizes}"


def choose_microbatches(batch_size: int, microbatches: int, dp: int) -> int:
    """The config's micro-batch count, or the largest smaller one that splits evenly over dp."""
    for m in range(microbatches, 0, -1):
        if batch_size % m == 0 and (batch_size // m) % dp == 0:
            return m
    raise ConfigError(f"data.batch_size={batch_size} cannot be split over {dp} data-parallel devices; "
                      f"use a multiple of {dp}")


def abstract_batch(loss: str, batch_size: int, seq_len: int, mesh, topk: int = 8) -> dict:
    """ShapeDtypeStructs (batch-sharded) of the keys `loss` reads."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    B, T = batch_size, seq_len
    batch = {k: sds((B, T), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = sds((B, T), jnp.float32)
    if loss == "grpo":
        batch.update(old_logprobs=sds((B, T), jnp.float32), ref_logprobs=sds((B, T), jnp.float32),
                     advantages=sds((B,), jnp.float32))
    elif loss == "dpo":
        batch["ref_logprobs"] = sds((B, T), jnp.float32)
    elif loss == "distill":
        batch.update(teacher_topk_ids=sds((B, T, topk), jnp.int32),
                     teacher_topk_logprobs=sds((B, T, topk), jnp.float32))
    return batch


def _shard_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def roofline(flops: float, hbm_bytes: float, collectives, model_flops: float, a=ASSUMPTIONS) -> dict:
    compute_s = flops / a["peak_flops"]
    memory_s = hbm_bytes / a["hbm_bytes_per_s"]
    comm = {"nvlink_s": 0.0, "network_s": 0.0}
    for c in collectives:
        n = c.group_size
        if n <= 1:
            continue
        moved = c.bytes * c.count * (n - 1) / n * (2 if c.kind == "all-reduce" else 1)
        if c.cross_node:
            comm["network_s"] += moved / a["network_bytes_per_s"]
        else:
            comm["nvlink_s"] += moved / a["nvlink_bytes_per_s"]
    step = max(compute_s, memory_s) + comm["nvlink_s"] + comm["network_s"]
    return {"compute_s": compute_s, "memory_s": memory_s, **comm, "est_step_s": step,
            "est_mfu": model_flops / (step * a["peak_flops"]) if step > 0 else 0.0}


def plan(cfg: ml_collections.ConfigDict, devices: int, hbm_gb: float = 141.0,
         platform: Optional[str] = None) -> dict[str, Any]:
    """The dry run (module docstring); `devices` simulated devices must exist (jax.devices()).

    `platform` is passed through for platform-specific lowering checks (None: CPU only).
    """
    del platform  # hook: a GPU lowering report (`--platform cuda`) plugs in here
    available = jax.devices()
    if len(available) < devices:
        raise ConfigError(f"--devices={devices} but jax sees {len(available)}; set XLA_FLAGS="
                          f"--xla_force_host_platform_device_count={devices} before jax starts "
                          "(python -m deepseek_jax.plan does)")
    sizes, mesh_note = choose_mesh(cfg, devices)
    mesh = sharding.make_mesh({a: s for a, s in sizes.items()}, available[:devices])
    dp = sharding.data_parallel_size(mesh)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    M = choose_microbatches(B, cfg.microbatches, dp)

    model_cfg = experiment.model_config(cfg)
    model = Transformer(model_cfg)
    opt_cfg = experiment.optimizer_config(cfg)
    optimizer = optim.make_optimizer(opt_cfg)
    rules = sharding.logical_rules(cfg.get("sharding_rules"))
    loss_cfg = experiment.loss_config(cfg)
    loss_fn = ts.bind_loss(cfg.loss, model, loss_cfg)
    step = ts.make_train_step(model, loss_fn, optimizer, mesh, rules, microbatches=M,
                              bias_update_rate=cfg.moe.bias_update_rate, loss_name=cfg.loss, loss_cfg=loss_cfg)
    state = ts.abstract_train_state(model, optimizer, mesh, rules)
    batch = abstract_batch(cfg.loss, B, T, mesh)

    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0  # tracing + lowering + XLA compilation

    mem = compiled.memory_analysis()
    params_b, opt_b = _shard_bytes(state.params), _shard_bytes(state.opt_state)
    temp_b = int(mem.temp_size_in_bytes)
    total_b = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp_b)
    hbm = int(hbm_gb * 1e9)

    hlo = hlo_stats.analyze(compiled.as_text(), devices, ASSUMPTIONS["gpus_per_node"])
    coll_bytes = {k.replace("-", "_"): 0 for k in hlo_stats.KINDS}
    for c in hlo["collectives"]:
        coll_bytes[c.kind.replace("-", "_")] += int(c.bytes * c.count)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    # cost_analysis counts loop bodies once; scale its HBM traffic like the FLOPs.
    xla_flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0)) * max(hlo["flops"] / xla_flops, 1.0) if xla_flops else 0.0
    stats = inspect_lib.model_stats(model_cfg, T)
    per_token = stats["flops_per_token"] + (stats["mtp_flops_per_token"] if model_cfg.num_mtp_layers else 0)
    model_flops = per_token * B * T / devices
    est = roofline(hlo["flops"], bytes_accessed, hlo["collectives"], model_flops)
    return {
        "devices": devices,
        "mesh": sizes,
        "fits": total_b <= hbm,
        "hbm_bytes": hbm,
        "per_device_bytes": {"params": params_b, "optimizer": opt_b, "temp": temp_b, "total": total_b},
        "collective_bytes": coll_bytes,
        "flops_per_device": hlo["flops"],
        "compile_s": compile_s,
        "est_step_s": est["est_step_s"],
        "est_mfu": est["est_mfu"],
        # Beyond the --json contract: how the numbers were reached.
        "details": {"mesh_note": mesh_note, "lower_s": lower_s, "microbatches": M, "batch_size": B, "seq_len": T,
                    "model_flops_per_device": model_flops, "xla_cost_analysis_flops": xla_flops,
                    "hbm_bytes_accessed": bytes_accessed, "attention_impl": model_cfg.attention_impl,
                    **{k: est[k] for k in ("compute_s", "memory_s", "nvlink_s", "network_s")},
                    "assumptions": ASSUMPTIONS},
    }


def format_report(r: dict) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"
    d = r["details"]
    lines = [f"devices {r['devices']}, mesh {r['mesh']}, microbatches {d['microbatches']} "
             f"(batch {d['batch_size']} x {d['seq_len']} tokens), attention {d['attention_impl']}"]
    if d["mesh_note"]:
        lines.append(f"  note: {d['mesh_note']}")
    p = r["per_device_bytes"]
    lines += [f"per device: params {gb(p['params'])}, optimizer {gb(p['optimizer'])}, temp {gb(p['temp'])}, "
              f"total {gb(p['total'])} of {gb(r['hbm_bytes'])} HBM -> fits: {r['fits']}",
              "collectives per step per device: " + ", ".join(f"{k} {gb(v)}" for k, v in r["collective_bytes"].items()),
              f"FLOPs per device per step {r['flops_per_device']:.3e} (model FLOPs {d['model_flops_per_device']:.3e}), "
              f"compile {r['compile_s']:.1f} s",
              f"roofline: compute {d['compute_s']:.3f} s, HBM {d['memory_s']:.3f} s, NVLink {d['nvlink_s']:.3f} s, "
              f"network {d['network_s']:.3f} s -> step {r['est_step_s']:.3f} s, MFU {100 * r['est_mfu']:.1f}%",
              "assumptions: " + ", ".join(f"{k}={v:g}" for k, v in d["assumptions"].items())
              + "; no compute/communication overlap; collectives charged to the network when a replica "
              "group spans nodes (device ids // gpus_per_node)"]
    return "\n".join(lines)
