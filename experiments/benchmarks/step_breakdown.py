"""Where the bench train step's time goes: each part timed alone as a jitted forward+backward.

    python experiments/benchmarks/step_breakdown.py                  # bench model, bfloat16
    python experiments/benchmarks/step_breakdown.py --dtype float32
    python experiments/benchmarks/step_breakdown.py --quick --json   # tiny shape, one JSON line

The model and batch are train_step_vs_hf.py's. Each part below is compiled on its own
(`jax.jit(jax.value_and_grad(...))` of the part's output against a fixed random cotangent,
gradients w.r.t. its parameters and its input, as the step differentiates it) with the real
parameter shapes and activations of the step, then all parts and the full step are timed
interleaved (common.alternate) and their medians multiplied by how often a step runs them:

  embedding        token lookup (its gradient is a scatter-add into the [V, D] table)
  attention        attn_norm + MLA (q/kv LoRA projections, RoPE, scores, softmax, values, o_proj)
  dense MLP        mlp_norm + SwiGLU of the first_k_dense_replace layers
  MoE router       router matmul (float32) + sigmoid / bias / group-limited top-k
  MoE experts      grouped SwiGLU of the routed copies as the model runs it (moe.grouped_ffn:
                   sort by expert, permute, grouped matmuls, un-permute) + the weighted combine
    of which ideal the same FLOPs as one perfectly balanced batched einsum [E, N K / E, D];
                   `experts - ideal` is the price of dispatch (sorting, padding, gathers)
  shared experts   the always-on SwiGLU expert
  head + CE        final RMSNorm, lm_head (float32 logits [B, T, V]) and cross-entropy
  optimizer        global-norm clip + AdamW over every parameter (+ frozen router bias)
  rest             full step - sum of the parts: residual adds, MoE statistics and balance
                   loss, the bias rule, gradient norm, and what fusion across parts saves
  forward only     the whole model's pretrain loss, forward alone (not a part, not summed):
                   against the full step it shows what the backward pass and optimizer cost

Also printed: XLA's own FLOP count of the compiled step (`jax.stages.Compiled.cost_analysis`)
against the model FLOPs that MFU uses, which exposes work the model formula does not count
(e.g. a dispatch that computes padded rows).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step_vs_hf as bench  # noqa: E402
from deepseek_jax import inspect as ds_inspect, moe as moe_lib, train_step  # noqa: E402
from deepseek_jax.attention import MLA, attention_mask  # noqa: E402
from deepseek_jax.layers import MLP, Embed, RMSNorm, matmul_2d, rope_cos_sin  # noqa: E402
from deepseek_jax.losses import token_logprobs  # noqa: E402
from deepseek_jax.optim import make_optimizer  # noqa: E402

SCRIPT = "step_breakdown.py"


def _fwd_bwd(fn, params, x, cot, *consts):
    """jit of value_and_grad of <fn(params, x, *consts), cot> w.r.t. params (and x when float).

    `consts` (routing ids, masks, RoPE tables, targets) are jit arguments, not closure
    constants, so XLA cannot constant-fold work the real step does at run time.
    """
    argnums = (0, 1) if jnp.issubdtype(x.dtype, jnp.floating) else 0

    def loss(p, x_, cot_, *c_):
        return jnp.vdot(fn(p, x_, *c_).astype(jnp.float32), cot_)

    g = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    return lambda: g(params, x, cot, *consts)


def parts(cfg, params, batch_np, seed: int = 0) -> dict:
    """name -> (closure running one jitted fwd+bwd, calls per train step)."""
    c, dt = cfg, jnp.dtype(cfg.dtype)
    tokens = jnp.asarray(batch_np["tokens"])
    B, T = tokens.shape
    D, V, E, K = c.hidden_size, c.vocab_size, c.n_routed_experts, c.num_experts_per_tok
    N = B * T
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    x = jax.random.normal(next(keys), (B, T, D), jnp.float32).astype(dt)
    cot = lambda shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    positions = jnp.asarray(batch_np["positions"])
    cos, sin = rope_cos_sin(positions, c)
    mask = attention_mask(jnp.asarray(batch_np["segment_ids"]), T)
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    n_dense = c.num_hidden_layers - n_moe
    moe_layer = next(i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)) if n_moe else None
    out = {}

    out["embedding"] = (_fwd_bwd(lambda p, t: Embed(V, D, dt).apply({"params": p}, t), params["embed"], tokens,
                                 cot((B, T, D))), 1)

    def attention(p, x_, cos_, sin_, mask_):
        h = RMSNorm(c.rms_norm_eps).apply({"params": p["attn_norm"]}, x_)
        return MLA(c).apply({"params": p["attn"]}, h, cos_, sin_, mask_)

    out["attention"] = (_fwd_bwd(attention, params["layers_0"], x, cot((B, T, D)), cos, sin, mask),
                        c.num_hidden_layers)

    if n_dense:
        def dense(p, x_):
            h = RMSNorm(c.rms_norm_eps).apply({"params": p["mlp_norm"]}, x_)
            return MLP(D, c.intermediate_size, dt).apply({"params": p["mlp"]}, h)

        first_dense = next(i for i in range(c.num_hidden_layers) if not c.is_moe_layer(i))
        out["dense MLP"] = (_fwd_bwd(dense, params[f"layers_{first_dense}"], x, cot((B, T, D))), n_dense)

    if n_moe:
        p_moe = params[f"layers_{moe_layer}"]["mlp"]
        x_NxD = x.reshape(N, D)
        bias = p_moe.get("e_score_correction_bias")

        def router(p, x_, bias_):
            logits = jnp.dot(x_.astype(jnp.float32), p["router"], precision=jax.lax.Precision.HIGHEST)
            return moe_lib.route(logits, bias_, c)[0]

        out["MoE router"] = (_fwd_bwd(router, {"router": p_moe["router"]}, x_NxD, cot((N, K)), bias), n_moe)
        logits = jnp.dot(x_NxD.astype(jnp.float32), p_moe["router"])
        weights_NxK, ids_NxK = moe_lib.route(logits, bias, c)
        ids_M, valid_M = ids_NxK.reshape(-1), jnp.ones((N * K,), bool)
        w_exp = {k: p_moe[k] for k in ("gate_proj", "up_proj", "down_proj")}

        def experts(p, x_, ids_, valid_, w_):
            y_MxD = moe_lib.grouped_ffn(x_, K, ids_, valid_, *(p[k].astype(dt) for k in w_exp))
            return jnp.einsum("nkd,nk->nd", y_MxD.reshape(N, K, D), w_.astype(y_MxD.dtype))

        out["MoE experts"] = (_fwd_bwd(experts, w_exp, x_NxD, cot((N, D)), ids_M, valid_M, weights_NxK), n_moe)
        rows = -(-N * K // E)  # balanced: every expert gets the mean load

        def ideal(p, x_):
            xs = jnp.resize(x_, (E * rows, D)).reshape(E, rows, D)
            h = (jax.nn.silu(jnp.einsum("erd,edf->erf", xs, p["gate_proj"].astype(dt)))
                 * jnp.einsum("erd,edf->erf", xs, p["up_proj"].astype(dt)))
            return jnp.einsum("erf,efd->erd", h, p["down_proj"].astype(dt))

        out["  of which ideal"] = (_fwd_bwd(ideal, w_exp, x_NxD, cot((E, rows, D))), n_moe)
        if c.n_shared_experts:
            F = c.moe_intermediate_size * c.n_shared_experts
            out["shared experts"] = (_fwd_bwd(lambda p, x_: MLP(D, F, dt).apply({"params": p}, x_),
                                              p_moe["shared_experts"], x, cot((B, T, D))), n_moe)

    targets = jnp.asarray(batch_np["targets"])
    loss_mask = jnp.asarray(batch_np["loss_mask"])

    def head_ce(p, h, targets_, mask_):
        h = RMSNorm(c.rms_norm_eps).apply({"params": p["final_norm"]}, h)
        logits = matmul_2d(h.astype(dt), p["lm_head"]["kernel"].astype(dt), 1)  # as the model's lm_head
        return -jnp.sum(mask_ * token_logprobs(logits, targets_)[0]) / jnp.sum(mask_)

    out["head + CE"] = (_fwd_bwd(head_ce, {"final_norm": params["final_norm"], "lm_head": params["lm_head"]},
                                 x, jnp.float32(1.0), targets, loss_mask), 1)

    optimizer = make_optimizer(bench.optimizer_config())
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    @jax.jit
    def opt_step(p, s, g):
        updates, s = optimizer.update(g, s, p)
        return jax.tree.map(jnp.add, p, updates), s

    out["optimizer"] = (lambda: opt_step(params, opt_state, grads), 1)
    return out


FORWARD = "forward only (whole model, loss)"
SUMMED = ("embedding", "attention", "dense MLP", "MoE router", "MoE experts", "shared experts", "head + CE",
          "optimizer")


def run(args) -> dict:
    quick = args.quick
    common.enable_compile_cache()
    cfg = bench.model_config(quick, args.dtype)
    B, T = (bench.QUICK_BATCH, bench.QUICK_SEQ) if quick else (bench.BENCH_BATCH, bench.BENCH_SEQ)
    batch_np = bench.make_batch(cfg.vocab_size, B, T, args.seed)
    step_fn, holder, params0, model = bench.build_ours(cfg, batch_np, args.seed)
    # XLA's count of the compiled step's FLOPs (forward, backward, optimizer); lowered before
    # the first run, which donates the state.
    cost = holder["step"].lower(holder["state"], holder["batch"]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    params = jax.tree.map(jnp.asarray, params0)
    fns = parts(cfg, params, batch_np, args.seed)
    loss_fn = train_step.bind_loss("pretrain", model, bench.LOSS)
    forward = jax.jit(lambda p, b: loss_fn(p, b, None)[0])
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    fns[FORWARD] = (lambda: forward(params, batch), 1)
    flops_per_step = ds_inspect.model_stats(cfg, seq_len=T)["flops_per_token"] * B * T

    n = 1024 if quick else 2048
    peak_before = common.matmul_peak_flops(args.dtype, n=n)
    timed = {"full step": step_fn, **{k: v[0] for k, v in fns.items()}}
    times = common.alternate(timed, steps=args.repeats, warmup=2)
    # Again after the timed steps, and the higher of the two (train_step_vs_hf.py says why).
    peak_after = common.matmul_peak_flops(args.dtype, n=n)
    peak = max(peak_before, peak_after)
    med = {k: statistics.median(v) for k, v in times.items()}
    step_s = med["full step"]
    rows = []
    for name, (_, calls) in fns.items():
        rows.append(dict(part=name, ms_per_call=1e3 * med[name], calls=calls, ms_per_step=1e3 * med[name] * calls,
                         share=med[name] * calls / step_s))
    summed = sum(r["ms_per_step"] for r in rows if r["part"] in SUMMED) / 1e3
    rows.append(dict(part="rest (step - sum of parts)", ms_per_call=float("nan"), calls=1,
                     ms_per_step=1e3 * (step_s - summed), share=(step_s - summed) / step_s))
    rows.append(dict(part="full step", ms_per_call=1e3 * step_s, calls=1, ms_per_step=1e3 * step_s, share=1.0))
    rows.append(rows.pop(next(i for i, r in enumerate(rows) if r["part"] == FORWARD)))  # after the sum, apart
    return dict(dtype=args.dtype, batch=B, seq=T, step_s=step_s, tokens_per_s=B * T / step_s,
                mfu=flops_per_step / step_s / peak, peak=peak, peak_before_after=(peak_before, peak_after),
                model_flops=flops_per_step, xla_flops=xla_flops,
                rows=rows, machine=common.machine_info(), model=bench.describe(cfg))


def format_table(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        per_call = "-" if np.isnan(r["ms_per_call"]) else f"{r['ms_per_call']:.2f}"
        rows.append([r["part"], per_call, r["calls"], f"{r['ms_per_step']:.1f}", f"{100 * r['share']:.1f}%"])
    return common.markdown_table(["part (fwd+bwd)", "ms per call", "calls per step", "ms per step", "share of step"],
                                 rows)


def summary(result: dict) -> str:
    return (f"Model: {result['model']}; batch {result['batch']} x {result['seq']}, compute {result['dtype']}. "
            f"Full step {1e3 * result['step_s']:.1f} ms = {result['tokens_per_s']:,.0f} tokens/s, MFU "
            f"{100 * result['mfu']:.1f}% of a {result['peak'] / 1e9:,.0f} GFLOP/s {result['dtype']} matmul "
            f"peak measured in this run (the higher of {result['peak_before_after'][0] / 1e9:,.0f} before and "
            f"{result['peak_before_after'][1] / 1e9:,.0f} after the timed steps). XLA cost analysis of the "
            f"compiled step: {result['xla_flops'] / 1e9:,.3f} GFLOP vs {result['model_flops'] / 1e9:,.3f} GFLOP "
            f"model FLOPs ({result['xla_flops'] / result['model_flops']:.2f}x).")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and batch, 2 timed runs per part")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--repeats", type=int, help="timed runs per part (default 7; --quick: 2)")
    p.add_argument("--results", help=f"markdown file for the section (default {common.RESULTS}; --quick: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default_malloc", action="store_true", help="glibc malloc's defaults (default: restart "
                   "with common.MALLOC_TUNABLES)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    if args.results is None and not args.quick:
        args.results = str(common.RESULTS)
    return args


def main(argv=None):
    as_script = argv is None  # only a script's own process is restarted
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if as_script and not args.default_malloc:
        common.reexec_with_malloc_tunables()
    result = run(args)
    table = format_table(result)
    if args.json:
        keys = ("dtype", "step_s", "tokens_per_s", "mfu", "xla_flops", "model_flops", "peak_before_after")
        print(json.dumps({k: result[k] for k in keys}
                         | {"parts_ms": {r["part"]: r["ms_per_step"] for r in result["rows"]}}))
    else:
        print(table)
        print()
        print(summary(result))
    if args.results:
        body = (f"Command: `{common.command_line(SCRIPT, argv)}`\n\n{common.machine_line(result['machine'])} "
                "Shared machine: the shares are from one process with the parts interleaved; absolute times "
                f"drift between runs.\n\n{table}\n\n{summary(result)}")
        common.write_section(args.results, f"{SCRIPT} ({args.dtype})", body)
    return result


if __name__ == "__main__":
    main()
