"""Will this config run on N GPUs, with which mesh, and how fast? A dry run, nothing allocated.

    python -m deepseek_jax.plan --config configs/tiny_v3.py --devices 8
    python -m deepseek_jax.plan --config configs/deepseek_v3.py --devices 256 --hbm_gb 141 --json
    python -m deepseek_jax.plan --config configs/tiny_v3.py --config.data.seq_len=4096 --devices 8
    python -m deepseek_jax.plan --config configs/tiny_v3.py:bf16 --devices 8 --platform cuda --json

Compiles the real train step ahead of time on N simulated CPU devices
(--xla_force_host_platform_device_count) with the config's mesh and sharding rules, and
prints per-device memory, FLOPs, collective bytes, compile time and a roofline estimate
on H200 nodes (planning.py has the rules and assumptions). `--json` prints one line with
the keys devices, mesh, fits, hbm_bytes, per_device_bytes, collective_bytes,
flops_per_device, compile_s, est_step_s, est_mfu (plus `details`).

`--platform cuda` lowers instead of compiling: the train step on the same mesh and the
sampler's decode for NVIDIA GPUs (gpu_lowering.py, needs the `[gpu]` extra), and reports
lowered (bool), custom_calls (the kernels in the modules) and ragged_dot_ops (must be 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m deepseek_jax.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="path.py[:arg]; --config.key=value overrides follow")
    parser.add_argument("--devices", type=int, required=True, help="simulated devices (e.g. 256 GPUs)")
    parser.add_argument("--hbm_gb", type=float, default=141.0, help="memory per device (H200: 141)")
    parser.add_argument("--platform", default=None, choices=("cuda",),
                        help="instead: lower (not compile) the train step and decode for this platform "
                             "and report lowered, custom_calls (the GPU kernels) and ragged_dot_ops")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; overrides look like --config.data.seq_len=4096")
    return args, rest


def main(argv: Optional[list] = None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Before jax starts its CPU backend: N simulated devices, and CPU even where a GPU exists.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from deepseek_jax import experiment, planning

    cfg = experiment.load_config(args.config, overrides)
    if args.platform:
        result = lowering_report(cfg, args.devices, args.platform)
        print(json.dumps(result) if args.json else format_lowering_report(result))
        return result
    result = planning.plan(cfg, args.devices, args.hbm_gb, platform=args.platform)
    print(json.dumps(result) if args.json else planning.format_report(result))
    return result


def lowering_report(cfg, devices: int, platform: str) -> dict:
    """`--platform cuda`: the train step (on the mesh `plan` would choose) and the sampler's
    decode lowered for `platform` on this CPU host (gpu_lowering.py): keys devices, mesh,
    platform, lowered, custom_calls, ragged_dot_ops (+ error, train, decode, details)."""
    import jax

    from deepseek_jax import gpu_lowering, planning

    sizes, mesh_note = planning.choose_mesh(cfg, devices)
    cfg.mesh.update(sizes)
    out = gpu_lowering.lower_for_cuda(cfg, jax.devices()[:devices])
    return {"devices": devices, "mesh": sizes, "platform": platform, **out, "details": {"mesh_note": mesh_note}}


def format_lowering_report(r: dict) -> str:
    lines = [f"devices {r['devices']}, mesh {r['mesh']}, lowered for {r['platform']}: {r['lowered']}"]
    if r["details"]["mesh_note"]:
        lines.append(f"  note: {r['details']['mesh_note']}")
    if "error" in r:
        lines.append(f"  error: {r['error']}")
    lines += [f"kernels (custom calls): {', '.join(r['custom_calls']) or 'none'}",
              f"ragged_dot ops: {r['ragged_dot_ops']} (XLA:GPU runs them as a dense dot over all experts)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
