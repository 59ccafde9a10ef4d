"""Will this config run on N GPUs, with which mesh, and how fast? A dry run, nothing allocated.

    python -m deepseek_jax.plan --config configs/tiny_v3.py --devices 8
    python -m deepseek_jax.plan --config configs/deepseek_v3.py --devices 256 --hbm_gb 141 --json
    python -m deepseek_jax.plan --config configs/tiny_v3.py --config.data.seq_len=4096 --devices 8

Compiles the real train step ahead of time on N simulated CPU devices
(--xla_force_host_platform_device_count) with the config's mesh and sharding rules, and
prints per-device memory, FLOPs, collective bytes, compile time and a roofline estimate
on H200 nodes (planning.py has the rules and assumptions). `--json` prints one line with
the keys devices, mesh, fits, hbm_bytes, per_device_bytes, collective_bytes,
flops_per_device, compile_s, est_step_s, est_mfu (plus `details`).
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
    parser.add_argument("--platform", default=None, help="also lower for this platform (a lowering-only check)")
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
    result = planning.plan(cfg, args.devices, args.hbm_gb, platform=args.platform)
    print(json.dumps(result) if args.json else planning.format_report(result))
    return result


if __name__ == "__main__":
    main()
