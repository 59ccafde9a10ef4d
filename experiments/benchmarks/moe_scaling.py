"""MoE layer forward+backward time per token on CPU as the routed expert count E grows.

    python experiments/benchmarks/moe_scaling.py                  # E = 8..256, ~2 min on 2 cores
    python experiments/benchmarks/moe_scaling.py --quick --json   # tiny smoke run, JSON on stdout

Top-k and the expert width are fixed, so every E activates the same FLOPs per token
(K experts of width F); only the total parameters grow. Each row times the whole MoE layer
(router, routing, dispatch, experts, combine; no shared expert) under `jax.grad` with
respect to all parameters and the input, in float32. Beside the dropless backend (the
default; the block-sparse tiled grouped matmul on CPU) it times the capacity backend
(factor 1.25) and the dense reference (every expert on every token, E / K times the FLOPs:
only for E <= --dense_max_experts), and a dense SwiGLU of width K * F, which has the same
activated FLOPs. Acceptance: dropless time per token within 1.5x of E = 8 and within 2x of
the dense SwiGLU (printed as ok / MISSED; the exit status does not depend on it). All
variants are measured in one process, interleaved step by step (common.alternate), so a
slow period on a shared machine hits each of them alike.
Writes (replaces) the `moe_scaling.py` section of RESULTS.md; --quick writes only with --results.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepseek_jax import moe  # noqa: E402
from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.layers import MLP  # noqa: E402

SCALING_LIMIT = 1.5  # dropless time per token vs E = 8
DENSE_LIMIT = 2.0  # dropless vs a dense SwiGLU with the same activated FLOPs


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every row")
    p.add_argument("--experts", help="comma-separated E (default 8,32,64,128,256; --quick: 4,8)")
    p.add_argument("--tokens", type=int, help="tokens per step (default 8192; --quick: 64)")
    p.add_argument("--hidden", type=int, help="model width D (default 256; --quick: 16)")
    p.add_argument("--ffn", type=int, help="expert width F (default 128; --quick: 8)")
    p.add_argument("--top_k", type=int, help="experts per token K (default 4; --quick: 2)")
    p.add_argument("--dense_max_experts", type=int, help="largest E timed with dense dispatch (default 32; --quick: 4)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 5; --quick: 2)")
    p.add_argument("--results", help=f"markdown file to write (default {common.RESULTS}; --quick: none)")
    a = p.parse_args(argv)
    q = a.quick
    a.experts = [int(e) for e in (a.experts or ("4,8" if q else "8,32,64,128,256")).split(",")]
    a.dense_max_experts = a.dense_max_experts or (4 if q else 32)
    a.tokens = a.tokens or (64 if q else 8192)
    a.hidden = a.hidden or (16 if q else 256)
    a.ffn = a.ffn or (8 if q else 128)
    a.top_k = a.top_k or (2 if q else 4)
    a.steps = a.steps or (1 if q else 5)
    if a.results is None and not q:
        a.results = str(common.RESULTS)
    return a


def _grad_step(module, params, x, r):
    """jitted (loss, grads wrt params and x) of sum(y * r); returns a no-arg step."""
    def loss(p, x):
        y = module.apply({"params": p}, x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(y * r)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: fn(params, x)


def build_variants(a) -> dict:
    D, F, K, N = a.hidden, a.ffn, a.top_k, a.tokens
    x = jax.random.normal(jax.random.key(0), (1, N, D), jnp.float32)
    r = jax.random.normal(jax.random.key(1), (1, N, D), jnp.float32)
    mlp = MLP(D, K * F, jnp.float32)
    variants = {("swiglu", 0): _grad_step(mlp, nn.meta.unbox(mlp.init(jax.random.key(2), x)["params"]), x, r)}
    for E in a.experts:
        base = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=F,
                           scoring_func="softmax", capacity_factor=1.25)
        params = nn.meta.unbox(jax.eval_shape(moe.MoE(base).init, jax.random.key(3), x)["params"])
        params = jax.tree.map(lambda s: 0.05 * jax.random.normal(jax.random.key(4), s.shape, s.dtype), params)
        for dispatch in ("dropless", "capacity", "dense"):
            if dispatch == "dense" and E > a.dense_max_experts:
                continue
            if a.quick and dispatch != "dropless" and E != a.experts[0]:
                continue  # smoke runs: fewer compiles
            variants[(dispatch, E)] = _grad_step(moe.MoE(base.replace(moe_dispatch=dispatch)), params, x, r)
    return variants


def measure(a) -> list[dict]:
    variants = build_variants(a)
    times = common.alternate({f"{k[0]}/{k[1]}": fn for k, fn in variants.items()}, steps=a.steps, warmup=1)
    us = {name: 1e6 * common.median(t) / a.tokens for name, t in times.items()}
    base8, swiglu = us.get(f"dropless/{a.experts[0]}"), us["swiglu/0"]
    rows = [dict(variant="dense SwiGLU (width K*F)", E=0, dispatch="swiglu", us_per_token=swiglu)]
    for E in a.experts:
        for dispatch in ("dropless", "capacity", "dense"):
            name = f"{dispatch}/{E}"
            if name in us:
                rows.append(dict(variant=f"MoE {dispatch}", E=E, dispatch=dispatch, us_per_token=us[name],
                                 vs_first_E=us[name] / base8, vs_swiglu=us[name] / swiglu))
    return rows


def verdict(rows) -> dict:
    dropless = [r for r in rows if r["dispatch"] == "dropless"]
    worst_scaling = max(r["vs_first_E"] for r in dropless)
    worst_dense = max(r["vs_swiglu"] for r in dropless)
    return dict(worst_vs_first_E=worst_scaling, worst_vs_swiglu=worst_dense,
                scaling_ok=worst_scaling <= SCALING_LIMIT, swiglu_ok=worst_dense <= DENSE_LIMIT)


def table(rows, a) -> str:
    lines = [f"| variant | E | us / token | vs dropless E={a.experts[0]} | vs dense SwiGLU |", "|---|---|---|---|---|"]
    for r in rows:
        rel = lambda k: f"{r[k]:.2f}x" if k in r else "-"
        lines.append(f"| {r['variant']} | {r['E'] or '-'} | {r['us_per_token']:.3f} | {rel('vs_first_E')} | "
                     f"{rel('vs_swiglu')} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    rows = measure(a)
    v = verdict(rows)
    text = table(rows, a)
    shape = (f"N={a.tokens} tokens, D={a.hidden}, F={a.ffn}, K={a.top_k}, float32, forward+backward "
             f"(grads of all parameters and the input), median of {a.steps} interleaved steps")
    summary = (f"Dropless worst vs E={a.experts[0]}: {v['worst_vs_first_E']:.2f}x (limit {SCALING_LIMIT}x, "
               f"{'ok' if v['scaling_ok'] else 'MISSED'}); worst vs dense SwiGLU: {v['worst_vs_swiglu']:.2f}x "
               f"(limit {DENSE_LIMIT}x, {'ok' if v['swiglu_ok'] else 'MISSED'}). Grouped matmul: "
               f"{moe.grouped_impl()}.")
    if a.json:
        # A light machine description (common.machine_info imports torch: seconds).
        machine = dict(cpus=os.cpu_count(), backend=jax.default_backend(), jax=jax.__version__)
        print(json.dumps(dict(rows=rows, verdict=v, shape=shape, machine=machine)))
    else:
        print(shape)
        print(text)
        print(summary)
    if a.results:
        body = "\n\n".join([common.machine_line(), f"Command: `{common.command_line('moe_scaling.py', argv)}`",
                            shape + ".", text, summary])
        common.write_section(a.results, "moe_scaling.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
