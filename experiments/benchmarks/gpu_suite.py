"""One GPU call (<= 8 minutes on one H200): GPU kernels checked, then train-step MFU, grouped
GEMM, flash attention, routing kernels and decode timed.

    python experiments/benchmarks/gpu_suite.py                 # GPU: everything, ~6-8 min
    python experiments/benchmarks/gpu_suite.py --parts train   # a subset of PARTS
    python experiments/benchmarks/gpu_suite.py --quick         # CPU smoke run: tiny shapes, interpret mode

Parts, run in this order, each only if its MIN_LEFT_S still fits in --budget_s (420 s by
default; a part that does not fit is reported as skipped, one that fails is reported with its
error, and the others still run):

  kernels  correctness first (gpu_kernel_checks.py): tokamax's grouped FFN (output and
           gradients) against the tiled CPU path in float32, tokamax's flash attention at
           MLA head dims (192 / 128), causal within packed documents, against the dense
           reference in float32.
  train    a ~1B-activated-parameter DeepSeek-V3-style MoE (12 layers, hidden 2048, MLA 16
           heads, 32 routed experts top-6 + 2 shared, 3.5B total), bfloat16 compute, float32
           master weights and AdamW, on a mesh over the one GPU, batch 16 x 1024; the step of
           train_step.make_train_step with the pretrain loss, once per MoE dispatch
           (dropless: tokamax's grouped GEMM; capacity 1.25: dense batched einsum), flash
           attention, the Pallas routing kernel. Checks: the first CE
           is within 0.5 of ln(V) (random init), every loss and gradient norm is finite, no
           update skipped, and the loss falls over the timed steps (one batch, repeated).
           Reports the median step, tokens/s, MFU against a bf16 matmul peak measured in
           the same run, and XLA's FLOP count of the compiled step over the model FLOPs (a
           ratio far above 1 means a dense fallback, e.g. ragged_dot without cuDNN).
  gemm     one grouped GEMM at V3 expert shapes (D 7168, F 2048, 32 local experts, 32k
           copies) against the dense GEMM of the same FLOPs, forward and forward + backward;
           XLA's ragged_dot (a dense dot over all experts on GPU) for context.
  attention  flash vs blockwise attention, forward + backward, B 4 x T 4096, 16 MLA heads.
  routing  gpu_routing.py's kernel vs reference at V3 / V2 shapes (T = 16k tokens).
  decode   decode.py's absorbed vs naive MLA decode step on the train part's model (bf16,
           batch 32, 4k cached tokens), and a Sampler rollout (absorbed).

Prints one table and the issue-17 targets (train MFU >= 35%, grouped GEMM >= 60% of the dense
GEMM, Pallas routing >= 2x XLA's at V3 shapes: met or missed), and writes the `gpu_suite.py`
section of RESULTS.md with the date and the command (--quick: only with --results). Exits
non-zero if any check fails (a missed target is reported, not a failed check).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402

import decode as decode_bench  # noqa: E402
import gpu_kernel_checks as kernel_checks  # noqa: E402
import gpu_routing  # noqa: E402
import train_step_vs_hf as bench  # noqa: E402
from deepseek_jax import inspect as ds_inspect  # noqa: E402
from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402

SCRIPT = "gpu_suite.py"
PARTS = ("kernels", "train", "gemm", "attention", "routing", "decode")
GPU_MOE_1B = dict(
    name="gpu_moe_1b", vocab_size=32000, hidden_size=2048, num_hidden_layers=12, intermediate_size=8192,
    max_position_embeddings=8192, attention="mla", num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=32, n_shared_experts=2,
    num_experts_per_tok=6, moe_intermediate_size=1408, first_k_dense_replace=1, scoring_func="sigmoid",
    n_group=8, topk_group=4, group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5,
    router_bias=True, num_mtp_layers=0, routing_impl="auto")
QUICK_MOE = dict(bench.QUICK_MODEL, name="quick_moe", routing_impl="auto", max_position_embeddings=128)
SETTINGS = {  # (batch, seq, timed steps, routing T, decode batch, decode context, rollout new tokens)
    False: dict(batch=16, seq=1024, steps=8, routing_tokens=16384, decode_batch=32, context=4096, decode_steps=16,
                prompt_len=128, new_tokens=128, repeats=5, dispatches=("dropless", "capacity"),
                routing_models=tuple(gpu_routing.MODELS), decode_dtype="bfloat16"),
    True: dict(batch=2, seq=32, steps=3, routing_tokens=37, decode_batch=2, context=16, decode_steps=2,
               prompt_len=8, new_tokens=4, repeats=1, dispatches=("dropless",),
               # XLA:CPU cannot run the bf16 decode path (DotThunk: BF16 x BF16 = F32), so CPU
               # smoke runs decode in float32.
               routing_models=("V3",), decode_dtype="float32"),
}
# Seconds a part needs at least (compile included) on an H200: it is skipped when less is left.
MIN_LEFT_S = {"kernels": 40.0, "train": 150.0, "gemm": 30.0, "attention": 30.0, "routing": 30.0,
              "decode": 120.0}
TARGETS = {"train MFU": 0.35, "grouped GEMM / dense": 0.6, "routing speed-up (V3)": 2.0}
CE_WINDOW = 0.5  # |first CE - ln V| at random init
DECODE_ATOL = {"float32": decode_bench.LOGITS_ATOL, "bfloat16": 3e-2}


class Row(dict):
    """One table row: part, case, metric columns, check."""


def _row(part, case, check, **cols):
    return Row(part=part, case=case, check=check, **cols)


def train_part(s, quick, peak, deadline, state_out) -> list[Row]:
    rows = []
    for dispatch in s["dispatches"]:
        if time.monotonic() > deadline - MIN_LEFT_S["train"]:
            rows.append(_row("train", dispatch, "skipped (time budget)"))
            continue
        cfg = ModelConfig.from_dict(dict(QUICK_MOE if quick else GPU_MOE_1B, dtype="bfloat16", moe_dispatch=dispatch))
        B, T = s["batch"], s["seq"]
        batch_np = bench.make_batch(cfg.vocab_size, B, T, seed=0)
        flops = ds_inspect.model_stats(cfg, seq_len=T)["flops_per_token"] * B * T
        run, holder, _, _ = bench.build_ours(cfg, batch_np, seed=0, host_copy=False)
        compiled = holder["step"].lower(holder["state"], holder["batch"]).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float((cost or {}).get("flops", math.nan))
        del compiled
        start = time.perf_counter()
        _, m = common.block(run())  # compiles (from the cache the AOT compile filled)
        first_s = time.perf_counter() - start
        losses, norms, skipped = [float(m["loss"])], [float(m["grad_norm"])], [float(m["skipped"])]
        times = []
        for _ in range(s["steps"]):
            t0 = time.perf_counter()
            _, m = common.block(run())
            times.append(time.perf_counter() - t0)
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
            skipped.append(float(m["skipped"]))
        med = statistics.median(times)
        problems = []
        if abs(holder["first_ce"] - math.log(cfg.vocab_size)) > CE_WINDOW:
            problems.append(f"first CE {holder['first_ce']:.3f} not within {CE_WINDOW} of ln V")
        if not all(map(math.isfinite, losses + norms)):
            problems.append("non-finite loss or grad norm")
        if any(skipped):
            problems.append(f"{int(sum(skipped))} updates skipped")
        if not losses[-1] < losses[0]:
            problems.append(f"loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
        stats = ds_inspect.model_stats(cfg, seq_len=T)
        rows.append(_row(
            "train", f"{dispatch}, {stats['activated_params'] / 1e6:,.1f}M activated / "
            f"{stats['total_params'] / 1e6:,.1f}M total, {B}x{T} bf16",
            "; ".join(problems) or "ok", ms=1e3 * med, tokens_per_s=B * T / med, mfu=flops / med / peak,
            extra=f"XLA/model FLOPs {xla_flops / flops:.2f}; loss {losses[0]:.3f}->{losses[-1]:.3f}; "
                  f"first call {first_s:.0f} s"))
        if dispatch == s["dispatches"][0]:
            state_out["config"], state_out["params"] = cfg, holder["state"].params
        del run, holder, m  # free the optimizer state before the next variant builds its own
    return rows


def routing_part(s, interpret) -> list[Row]:
    rows = []
    for i, model in enumerate(s["routing_models"]):
        for r in gpu_routing.bench_one(model, s["routing_tokens"], [16], interpret=interpret,
                                       repeats=max(2, s["repeats"]), seed=i):
            rows.append(_row("routing", f"{model} {r['impl']} T={r['T']}", r["check"], ms=r["fwd_bwd_ms"],
                             extra=f"fwd {r['fwd_ms']:.3f} ms; rows with other experts {r['flipped_rows']:.1e}; "
                                   f"max dw {r['max_dw']:.1e}"))
    return rows


def decode_part(s, quick, state) -> list[Row]:
    cfg = state.get("config") or ModelConfig.from_dict(dict(QUICK_MOE if quick else GPU_MOE_1B))
    cfg = cfg.replace(dtype=s["decode_dtype"])
    params = state.get("params")
    if params is None:
        from deepseek_jax.model import init_params
        params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    model = Transformer(cfg)
    rows = []
    tol = DECODE_ATOL[cfg.dtype]
    for r in decode_bench.bench_decode_step(model, params, s["decode_batch"], s["context"], s["decode_steps"],
                                            s["repeats"], seed=0):
        ok = r["max_logit_diff"] <= tol
        rows.append(_row("decode", f"step {r['impl']}, batch {r['batch']}, context {r['context']}",
                         "ok" if ok else f"absorbed vs naive logits differ by {r['max_logit_diff']:.1e} > {tol}",
                         ms=r["ms_per_step"], tokens_per_s=r["tokens_per_s"],
                         extra=f"naive/absorbed {r['naive_over_absorbed']:.2f}x; max dlogit {r['max_logit_diff']:.1e}"))
    if not quick:
        for r in decode_bench.bench_rollout(model, params, s["decode_batch"], s["prompt_len"], s["new_tokens"],
                                            s["repeats"], seed=0, impls=("absorbed",)):
            rows.append(_row("decode", f"rollout {r['impl']}, batch {r['batch']}, {s['prompt_len']}+"
                             f"{s['new_tokens']} tokens", r["check"], ms=r["ms_per_step"],
                             tokens_per_s=r["tokens_per_s"], extra="Sampler.generate, prefill + while_loop"))
    return rows


def target_lines(rows) -> list[str]:
    """Each issue-17 performance target: measured value, met or missed (or not measured)."""
    mfu = [r["mfu"] for r in rows if r["part"] == "train" and r.get("mfu") is not None]
    ratio = [r["ratio"] for r in rows if r["part"] == "gemm" and "ratio" in r]
    v3 = {r["case"].split()[1]: r["ms"] for r in rows if r["part"] == "routing" and r["case"].startswith("V3 ")
          and r.get("ms") is not None}
    measured = {"train MFU": max(mfu) if mfu else None, "grouped GEMM / dense": ratio[0] if ratio else None,
                "routing speed-up (V3)": v3["reference"] / v3["pallas"] if {"reference", "pallas"} <= set(v3)
                else None}
    return [f"{name} >= {TARGETS[name]:g}: " + ("not measured" if v is None else
                                                f"{v:.2f} {'met' if v >= TARGETS[name] else 'MISSED'}")
            for name, v in measured.items()]


def format_table(rows) -> str:
    def f(x, fmt):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    return common.markdown_table(
        ["part", "case", "ms", "tokens/s", "MFU", "check", "notes"],
        [[r["part"], r["case"], f(r.get("ms"), ".2f"), f(r.get("tokens_per_s"), ",.0f"),
          "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", r["check"].replace("|", "/"),
          r.get("extra", "").replace("|", "/")] for r in rows])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, Pallas in interpret mode")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--budget_s", type=float, help="time budget of the whole call: a part (or train variant) "
                   "starts only if its MIN_LEFT_S still fits (default 420 s; --quick: no limit)")
    p.add_argument("--results", help=f"markdown file for the section (default {common.RESULTS}; --quick: none)")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    if args.results is None and not args.quick:
        args.results = str(common.RESULTS)
    if args.budget_s is None:
        args.budget_s = math.inf if args.quick else 420.0
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.quick:
        raise SystemExit(f"No GPU (jax backend is {jax.default_backend()!r}). "
                         "Run with --quick for the CPU smoke run of the same code paths.")
    common.enable_compile_cache()
    s = SETTINGS[args.quick]
    peak = common.matmul_peak_flops("bfloat16", n=1024 if args.quick else None)
    rows, state = [], {}
    for part in args.parts:
        if time.monotonic() > deadline - MIN_LEFT_S[part]:
            rows.append(_row(part, "-", "skipped (time budget)"))
            continue
        try:
            if part == "kernels":
                rows += [kernel_checks.check_grouped_ffn(args.quick), kernel_checks.check_flash_attention(args.quick)]
            elif part == "train":
                rows += train_part(s, args.quick, peak, deadline, state)
            elif part == "gemm":
                rows += kernel_checks.bench_grouped_gemm(args.quick, max(2, s["repeats"]))
            elif part == "attention":
                rows += kernel_checks.bench_attention(args.quick, max(2, s["repeats"]))
            elif part == "routing":
                rows += routing_part(s, interpret=not on_gpu)
            else:
                rows += decode_part(s, args.quick, state)
        except Exception as e:  # report and go on: one broken part must not hide the others
            traceback.print_exc()
            rows.append(_row(part, "-", f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"))
    table = format_table(rows) + "\n\nTargets: " + "; ".join(target_lines(rows)) + "."
    elapsed = time.monotonic() - t_start
    print(table)
    print(f"\nbf16 matmul peak {peak / 1e9:,.0f} GFLOP/s (measured); {elapsed:.0f} s in all")
    if args.results:
        mode = "GPU" if on_gpu else "CPU smoke run (interpret mode, tiny shapes: the numbers say nothing)"
        body = (f"Command: `{common.command_line(SCRIPT, argv)}`\n\n{common.machine_line()} Mode: {mode}. "
                f"bf16 matmul peak measured in this run: {peak / 1e9:,.0f} GFLOP/s; the suite took "
                f"{elapsed:.0f} s.\n\n{table}")
        common.write_section(args.results, SCRIPT, body)
    bad = [r for r in rows if r["check"] != "ok" and not r["check"].startswith("skipped")]
    if bad:
        raise SystemExit(f"{len(bad)} check(s) failed: see the check column")
    return rows


if __name__ == "__main__":
    main()
