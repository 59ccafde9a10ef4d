"""gpu_suite.py's kernel parts: tokamax's grouped GEMM and flash attention checked against the
CPU path's references first, then timed (grouped GEMM against a dense GEMM of the same FLOPs
at DeepSeek-V3 expert shapes; flash attention against the blockwise attention).

Dimension legend: S rows, M copies, E experts, D model width, F expert width, B batch,
T time, H heads, K query/key head dim, A value head dim.

On a GPU the kernels under test are gpu_kernels.grouped_ffn_tokamax / ragged_dot and
gpu_kernels.flash_attention. A CPU cannot run them, so `--quick` runs the same code with
the CPU stand-ins (jax.lax.ragged_dot, blockwise attention) at tiny shapes: it checks the
harness, not the kernels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import common
from deepseek_jax import dispatch, gpu_kernels
from deepseek_jax.attention import attention_mask, dot_product_attention
from deepseek_jax.blockwise_attention import blockwise_attention

# Check shapes: widths that are multiples of 64 (the Mosaic GPU kernels' tiles), uneven groups.
CHECK = {False: dict(S=512, copies=4, E=8, D=256, F=128, B=2, T=256, H=4, K=192, A=128),
         True: dict(S=16, copies=2, E=4, D=32, F=16, B=1, T=32, H=2, K=24, A=16)}
# Timing shapes: V3's expert (D 7168, F 2048); E = 32 local experts (256 over 8-way expert
# parallelism), M = 4096 tokens x 8 copies, balanced groups. MLA attention: K 192, A 128.
BENCH = {False: dict(E=32, M=32768, D=7168, F=2048, B=4, T=4096, H=16, K=192, A=128),
         True: dict(E=4, M=64, D=32, F=16, B=1, T=32, H=2, K=24, A=16)}
RTOL = 3e-2  # bf16 kernels against a float32 reference: max |diff| / max |reference|
GEMM_TARGET = 0.6  # grouped GEMM TFLOP/s over the dense GEMM's (issue 17)


def _rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def _worst(outs, refs) -> float:
    return max(_rel(a, b) for a, b in zip(jax.tree.leaves(outs), jax.tree.leaves(refs)))


def _row(part, case, check, **cols):
    return dict(part=part, case=case, check=check, **cols)


def check_grouped_ffn(quick: bool) -> dict:
    """grouped_ffn (tokamax on GPU) vs the tiled CPU path in float32: output and all gradients."""
    s = CHECK[quick]
    S, c, E, D, F = s["S"], s["copies"], s["E"], s["D"], s["F"]
    ks = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(ks[0], (S, D))
    ws = [jax.random.normal(k, shape) / math.sqrt(shape[1]) for k, shape in
          zip(ks[1:4], ((E, D, F), (E, D, F), (E, F, D)))]
    # Skewed experts (some get many copies, some none) and 1 in 8 copies invalid.
    ids = jnp.minimum(jax.random.geometric(ks[4], 0.3, (S * c,)) - 1, E - 1).astype(jnp.int32)
    valid = jax.random.uniform(ks[5], (S * c,)) > 0.125
    r = jax.random.normal(ks[6], (S * c, D))
    impl = "ragged" if quick else "tokamax"

    def loss(impl, dtype):
        def f(x, ws):
            y = dispatch.grouped_ffn(x.astype(dtype), c, ids, valid, *(w.astype(dtype) for w in ws), impl=impl)
            return jnp.sum(y.astype(jnp.float32) * r), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, y), g = loss(impl, jnp.bfloat16)(x, ws)
    (_, y_ref), g_ref = loss("tiled", jnp.float32)(x, ws)
    err = max(_rel(y, y_ref), _worst(g, g_ref))
    return _row("kernels", f"grouped FFN {impl} vs tiled f32, M={S * c} E={E} D={D} F={F}",
                "ok" if err <= RTOL else f"MISMATCH: rel err {err:.1e} > {RTOL}", extra=f"max rel err {err:.1e}")


def _flash(quick):
    if quick:
        return lambda q, k, v, scale, seg: blockwise_attention(q, k, v, scale=scale, causal=True, segment_ids=seg)
    return lambda q, k, v, scale, seg: gpu_kernels.flash_attention(q, k, v, scale=scale, causal=True,
                                                                   segment_ids=seg)


def check_flash_attention(quick: bool) -> dict:
    """Flash attention (tokamax on GPU) vs the dense reference in float32, MLA head dims,
    causal within two packed documents: output and q/k/v gradients."""
    s = CHECK[quick]
    B, T, H, K, A = s["B"], s["T"], s["H"], s["K"], s["A"]
    ks = jax.random.split(jax.random.key(1), 4)
    q, k = jax.random.normal(ks[0], (B, T, H, K)), jax.random.normal(ks[1], (B, T, H, K))
    v, r = jax.random.normal(ks[2], (B, T, H, A)), jax.random.normal(ks[3], (B, T, H, A))
    seg = (jnp.arange(T)[None] >= T // 3).astype(jnp.int32).repeat(B, 0)
    scale = 1.0 / math.sqrt(K)
    flash = _flash(quick)
    mask = attention_mask(seg, T, "reference")

    def grads(fn, dtype):
        f = lambda q, k, v: jnp.sum(fn(q.astype(dtype), k.astype(dtype), v.astype(dtype)).astype(jnp.float32) * r)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (_, g) = grads(lambda q, k, v: flash(q, k, v, scale, seg), jnp.bfloat16)
    (_, g_ref) = grads(lambda q, k, v: dot_product_attention(q, k, v, mask, scale), jnp.float32)
    out = jax.jit(lambda q, k, v: flash(q, k, v, scale, seg))(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                                              v.astype(jnp.bfloat16))
    err = max(_rel(out, dot_product_attention(q, k, v, mask, scale)), _worst(g, g_ref))
    name = "blockwise" if quick else "flash"
    return _row("kernels", f"attention {name} vs dense f32, B={B} T={T} H={H} K={K} A={A}, causal + 2 documents",
                "ok" if err <= RTOL else f"MISMATCH: rel err {err:.1e} > {RTOL}", extra=f"max rel err {err:.1e}")


def bench_grouped_gemm(quick: bool, repeats: int) -> list[dict]:
    """One grouped GEMM [M, D] x [E, D, F] (forward, and forward + both gradients) against the
    dense [M, D] x [D, F] GEMM of the same FLOPs, bf16; XLA's ragged_dot (forward) for context."""
    s = BENCH[quick]
    E, M, D, F = s["E"], s["M"], s["D"], s["F"]
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (M, D), jnp.bfloat16)
    w = (jax.random.normal(kw, (E, D, F)) / math.sqrt(D)).astype(jnp.bfloat16)
    sizes = jnp.full((E,), M // E, jnp.int32)
    grouped = jax.lax.ragged_dot if quick else gpu_kernels.ragged_dot
    fns = {"grouped": lambda x, w: grouped(x, w, sizes), "dense": lambda x, w: x @ w[0]}
    if not quick:
        fns["XLA ragged_dot"] = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
    flops = 2.0 * M * D * F
    rows, tflops = [], {}
    for name, fn in fns.items():
        fwd = jax.jit(fn)
        fwd_bwd = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w).astype(jnp.float32)), argnums=(0, 1)))
        try:
            t = common.median_time(fwd, x, w, repeats=repeats)
            tb = common.median_time(fwd_bwd, x, w, repeats=repeats) if name != "XLA ragged_dot" else math.nan
        except Exception as e:  # XLA's fallback may not fit; the others must work
            if name != "XLA ragged_dot":
                raise
            rows.append(_row("gemm", f"{name} (dense over all experts)", "skipped",
                             extra=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
            continue
        tflops[name] = (flops / t / 1e12, 3 * flops / tb / 1e12)
        rows.append(_row("gemm", f"{name}, M={M} E={E} D={D} F={F} bf16", "ok", ms=1e3 * t,
                         extra=f"fwd {tflops[name][0]:.1f} TFLOP/s; fwd+bwd {1e3 * tb:.2f} ms, "
                               f"{tflops[name][1]:.1f} TFLOP/s"))
    ratio = tflops["grouped"][1] / tflops["dense"][1]
    rows[0]["extra"] += f"; {100 * ratio:.0f}% of dense (fwd+bwd; target >= {100 * GEMM_TARGET:.0f}%)"
    rows[0]["ratio"] = ratio
    return rows


def bench_attention(quick: bool, repeats: int) -> list[dict]:
    """Causal attention forward + backward at MLA head dims: flash (GPU) vs blockwise, bf16."""
    s = BENCH[quick]
    B, T, H, K, A = s["B"], s["T"], s["H"], s["K"], s["A"]
    ks = jax.random.split(jax.random.key(3), 3)
    q, k = (jax.random.normal(kk, (B, T, H, K), jnp.bfloat16) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, A), jnp.bfloat16)
    scale = 1.0 / math.sqrt(K)
    fns = {"blockwise": lambda q, k, v: blockwise_attention(q, k, v, scale=scale, causal=True)}
    if not quick:
        fns["flash"] = lambda q, k, v: gpu_kernels.flash_attention(q, k, v, scale=scale, causal=True)
    # Causal: half the [T, T] scores; forward 2 matmuls (QK^T: K, PV: A), backward 2.5x that.
    fwd_flops = 2.0 * B * H * T * T * (K + A) / 2
    rows = []
    for name, fn in fns.items():
        f = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        t = common.median_time(f, q, k, v, repeats=repeats)
        rows.append(_row("attention", f"{name}, B={B} T={T} H={H} K={K} A={A} causal bf16", "ok", ms=1e3 * t,
                         tokens_per_s=B * T / t, extra=f"fwd+bwd {3.5 * fwd_flops / t / 1e12:.1f} TFLOP/s"))
    return rows
