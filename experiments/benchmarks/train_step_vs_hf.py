"""One training step of the same DeepSeek-V3-architecture model: deepseek_jax vs HF transformers.

    python experiments/benchmarks/train_step_vs_hf.py                 # full: ~10 min on 2 cores
    python experiments/benchmarks/train_step_vs_hf.py --quick --json  # tiny shape, one JSON line

The bench model (hidden 256, 4 layers with the first dense, 8 MLA heads with q_lora 128 /
kv_lora 64 / qk_nope 32 / qk_rope 16 / v_head 32, 16 routed experts top-2 + 1 shared,
moe_intermediate 128, dense intermediate 512, vocab 32000; batch 8 x 256) is built in
deepseek_jax, its initial weights are written with `hf.save_pretrained`, and
`DeepseekV3ForCausalLM` loads them, so both sides start from the same weights and the
first step's cross-entropy must agree (checked, float32).

One step = forward + backward + AdamW update with global-norm clipping at 1.0:
  ours  `train_step.make_train_step` with the `pretrain` loss (MTP off, seq_aux 1e-4, the
        aux-loss-free bias update on), float32 master weights, compute in float32 or
        bfloat16 (`ModelConfig.dtype`).
  HF    `model(input_ids, labels=...)` (its own shifted CE), `loss.backward()`,
        `clip_grad_norm_`, `torch.optim.AdamW(fused=True)`; SDPA attention; routed experts
        `eager` (loop over experts) and `grouped_mm` (`config.experts_implementation`,
        transformers/integrations/moe.py), each with and without `torch.compile`; and the
        grouped_mm model under `torch.autocast(bfloat16)`.
HF runs in a spawned worker process (torch's and XLA's thread pools and allocators never share
a process, as when users run either). Every variant is warmed up, then the variants take
turns, one step each, each round starting one variant later (A B C, B C A, ..; the other
process waits idle), and the medians are reported. MFU = model FLOPs per step
(`deepseek_jax.inspect`: 6 x activated matmul parameters + causal attention) / median step
time / the matmul peak measured in this run in the same dtype (jax's for ours, torch's for HF),
the higher of two measurements, before and after the timed steps.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import hf, inspect as ds_inspect, sharding, train_step  # noqa: E402
from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.losses import LossConfig  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402
from deepseek_jax.optim import OptimizerConfig, make_optimizer  # noqa: E402

SCRIPT = "train_step_vs_hf.py"
# The bench config of issue 4 (DeepSeek-V3 architecture at CPU size, no MTP as the HF
# reference), plus the execution choices pinned.
BENCH_MODEL = dict(name="bench_v3", vocab_size=32000, hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                   max_position_embeddings=1024, attention="mla", num_attention_heads=8, q_lora_rank=128,
                   kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                   n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
                   first_k_dense_replace=1, scoring_func="sigmoid", n_group=4, topk_group=2,
                   group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True,
                   num_mtp_layers=0, moe_dispatch="dropless", routing_impl="xla")
BENCH_BATCH, BENCH_SEQ = 8, 256
# --quick: one MoE layer (compile time dominates a smoke run and grows with the layers).
QUICK_MODEL = dict(BENCH_MODEL, name="bench_v3_quick", vocab_size=512, hidden_size=64, num_hidden_layers=1,
                   first_k_dense_replace=0,
                   intermediate_size=128, max_position_embeddings=64, num_attention_heads=4, q_lora_rank=32,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   n_routed_experts=8, moe_intermediate_size=32)
QUICK_BATCH, QUICK_SEQ = 2, 32
LEARNING_RATE, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1.0
LOSS = LossConfig(mtp_weight=0.0, seq_aux_alpha=1e-4)
# First step, ours vs HF on the same weights and batch: CE, and the global gradient norm
# (ours adds the 1e-4 sequence-wise balance loss, a small extra router gradient).
CE_RTOL, GRAD_RTOL = 2e-3, 2e-2
BF16_CE_RTOL, BF16_GRAD_RTOL = 2e-2, 1e-1
# Issue 16's targets: MFU of the same-run, same-dtype matmul peak, and >= 1.0x HF's fastest.
MFU_TARGETS = {"float32": 0.60, "bfloat16": 0.50}


def model_config(quick: bool, dtype: str = "float32") -> ModelConfig:
    return ModelConfig.from_dict(dict(QUICK_MODEL if quick else BENCH_MODEL, dtype=dtype))


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    """Random tokens; `targets` are the next tokens; the last position is not counted."""
    rng = np.random.default_rng(seed)
    seq_tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    mask = np.ones((batch, seq), np.float32)
    mask[:, -1] = 0.0  # HF's labels=input_ids scores positions 0..T-2 only
    return dict(tokens=seq_tokens[:, :-1], targets=seq_tokens[:, 1:], loss_mask=mask,
                segment_ids=np.ones((batch, seq), np.int32),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy())


def one_device_mesh():
    return sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])


def optimizer_config() -> OptimizerConfig:
    return OptimizerConfig(learning_rate=LEARNING_RATE, schedule="constant", warmup_steps=0, total_steps=10**6,
                           weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], clip_norm=CLIP)


def build_ours(cfg: ModelConfig, batch_np: dict, seed: int = 0, host_copy: bool = True):
    """(step closure, holder, initial float32 params (numpy; None without host_copy), model).

    The closure runs one donated train step; holder has the current "state", the "step" and
    "batch" (for `step.lower(state, batch)` before the first run), and the first step's CE
    and gradient norm once it ran.
    """
    model = Transformer(cfg)
    mesh, rules = one_device_mesh(), sharding.logical_rules()
    optimizer = make_optimizer(optimizer_config())
    state = train_step.create_train_state(model, optimizer, mesh, rules, seed)
    params0 = jax.tree.map(np.asarray, state.params) if host_copy else None
    step = train_step.make_train_step(model, train_step.bind_loss("pretrain", model, LOSS), optimizer, mesh,
                                      rules, bias_update_rate=1e-3)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch_np.items()},
                           sharding.batch_sharding(mesh, 2))
    holder = {"state": state, "step": step, "batch": batch, "first_ce": None, "first_grad_norm": None}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        if holder["first_ce"] is None:
            holder["first_ce"], holder["first_grad_norm"] = float(metrics["ce"]), float(metrics["grad_norm"])
        return holder["state"], metrics

    return run, holder, params0, model


def build_hf(path: str, impl: str, compile_: bool, autocast_bf16: bool, batch_np: dict, threads: int):
    """Step closure of transformers' DeepseekV3ForCausalLM loaded from `path`."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", experts_implementation=impl)
    model.train()
    if model.config._experts_implementation != impl:
        raise RuntimeError(f"transformers picked experts_implementation="
                           f"{model.config._experts_implementation!r}, not {impl!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=1e-8,
                            fused=True)
    # Default dynamic=None: the per-expert token counts change every step, so after the first
    # recompile torch marks those sizes dynamic (dynamic=False recompiles until the limit).
    fwd = torch.compile(model) if compile_ else model
    tokens = torch.from_numpy(batch_np["tokens"]).long()
    # HF shifts inside its loss (logits[t] scores labels[t + 1]): labels = the inputs, so the
    # last position is not scored; make_batch masks it out of ours too.
    labels = tokens.clone()
    holder = {"first_ce": None, "first_grad_norm": None}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = fwd(input_ids=tokens, labels=labels).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if holder["first_ce"] is None:
            holder["first_ce"], holder["first_grad_norm"] = value, float(grad_norm)
        return value

    return run, holder


def describe(c: ModelConfig) -> str:
    return (f"V3 architecture, hidden {c.hidden_size}, {c.num_hidden_layers} layers (first "
            f"{c.first_k_dense_replace} dense), {c.num_attention_heads} MLA heads, {c.n_routed_experts} routed "
            f"experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared, vocab {c.vocab_size}")


def hf_variants(quick: bool, compile_: bool, bf16: bool) -> list[tuple[str, str, bool, bool]]:
    """(name, experts_implementation, torch.compile, bf16 autocast) of each HF variant."""
    out = [(f"hf {impl}", impl, False, False) for impl in ("eager", "grouped_mm")]
    if compile_ and not quick:
        out += [(f"hf {impl} + compile", impl, True, False) for impl in ("eager", "grouped_mm")]
    if bf16 and not quick:
        out.append(("hf grouped_mm bf16 autocast", "grouped_mm", False, True))
    return out


def have_hf() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def warm_up(fn, steps: int) -> float:
    """Runs `steps` untimed steps; returns the first one's seconds (it compiles: reported apart)."""
    first_s = common.time_once(fn)
    for _ in range(steps - 1):
        common.block(fn())
    return first_s


def _hf_worker(conn, path: str, hf_list, batch_np: dict, threads: int, warmup: int, n: int, peak_dtypes):
    """The HF side, in its own process: torch's and XLA's thread pools and allocators never
    share one (each framework runs as its users run it). Measures torch's matmul peaks, builds
    and warms every variant, reports them, then runs one step per name received."""
    peaks = {d: common.torch_matmul_peak_flops(d, n=n) for d in peak_dtypes}
    runs, info, failed = {}, {}, {}
    for name, impl, comp, ac in hf_list:
        try:
            fn, holder = build_hf(path, impl, comp, ac, batch_np, threads)
            first_s = warm_up(fn, warmup)
        except Exception as e:  # an implementation this torch/transformers lacks: report it
            failed[name] = f"{type(e).__name__}: {e}"[:200]
            continue
        runs[name] = fn
        info[name] = dict(first_s=first_s, first_ce=holder["first_ce"], first_grad_norm=holder["first_grad_norm"],
                          dtype="bfloat16" if ac else "float32")
    conn.send((peaks, info, failed))
    for msg in iter(conn.recv, None):
        if isinstance(msg, tuple):  # ("peak", dtype): torch's peak again, after the timed steps
            conn.send(common.torch_matmul_peak_flops(msg[1], n=n))
        else:
            conn.send(common.time_once(runs[msg]))


class HFWorker:
    """Runs `_hf_worker` in a spawned process; `step(name)` is one timed HF step there."""

    def __init__(self, path: str, hf_list, batch_np: dict, threads: int, warmup: int, n: int, peak_dtypes):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_worker, daemon=True,
                                args=(child, path, hf_list, batch_np, threads, warmup, n, peak_dtypes))
        self.proc.start()
        self.peaks, self.info, self.failed = self.conn.recv()

    def step(self, name: str) -> float:
        self.conn.send(name)
        return self.conn.recv()

    def peak(self, dtype: str) -> float:
        self.conn.send(("peak", dtype))
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=60)


def run(args) -> dict:
    quick = args.quick
    B, T = (QUICK_BATCH, QUICK_SEQ) if quick else (BENCH_BATCH, BENCH_SEQ)
    B, T = args.batch or B, args.seq or T
    tokens_per_step = B * T
    cfg32 = model_config(quick, "float32")
    batch_np = make_batch(cfg32.vocab_size, B, T, args.seed)
    flops_per_token = ds_inspect.model_stats(cfg32, seq_len=T)["flops_per_token"]
    flops_per_step = flops_per_token * tokens_per_step
    # The output head's 6 D V of the model FLOPs: at vocab 32000 it is most of the step.
    head_share = 6.0 * cfg32.hidden_size * cfg32.vocab_size / flops_per_token
    use_hf = not args.no_hf and have_hf()
    info = common.machine_info()

    # Peaks first, on an idle machine (each variant's MFU is divided by its own dtype's peak).
    n = 1024 if quick else 2048
    peaks = {("jax", d): common.matmul_peak_flops(d, n=n) for d in args.dtypes}
    variants, failed = {}, {}  # name -> dict(run, holder, dtype, lib); name -> error
    params0 = model = None
    for d in args.dtypes:
        fn, holder, p0, m = build_ours(model_config(quick, d), batch_np, args.seed)
        try:
            first_s = warm_up(fn, args.warmup)
        except Exception as e:
            failed[f"ours {d}"] = f"{type(e).__name__}: {e}"[:200]
            continue
        variants[f"ours {d}"] = dict(run=fn, holder=holder, dtype=d, lib="jax", first_s=first_s)
        params0, model = (params0, model) if params0 is not None else (p0, m)
    worker = None
    if use_hf:
        hf_list = hf_variants(quick, not args.no_compile, "bfloat16" in args.dtypes)
        tmp = tempfile.TemporaryDirectory(prefix="bench_hf_")
        hf.save_pretrained(model, params0, tmp.name)
        # While the worker measures torch's peaks and compiles, this process waits idle.
        worker = HFWorker(tmp.name, hf_list, batch_np, args.threads or os.cpu_count(), args.warmup, n,
                          ["float32"] + (["bfloat16"] if any(v[3] for v in hf_list) else []))
        peaks.update({("torch", d): p for d, p in worker.peaks.items()})
        failed.update(worker.failed)
        for name, v in worker.info.items():
            first = dict(first_ce=v["first_ce"], first_grad_norm=v["first_grad_norm"])
            variants[name] = dict(run=functools.partial(worker.step, name), holder=first, dtype=v["dtype"],
                                  lib="torch", first_s=v["first_s"])

    # Ours run here, HF's in the worker: step i of every variant in turn, timed here.
    times = common.alternate({k: v["run"] for k, v in variants.items()}, steps=args.steps, warmup=0)
    # The peaks once more, after the timed steps: a shared machine's matmul throughput can move
    # 2x within seconds (measured: float32 154-266 GFLOP/s in eight calls over 30 s), and a peak
    # caught in a slow moment inflates every MFU divided by it. The higher of the two is used.
    late = {("jax", d): common.matmul_peak_flops(d, n=n) for d in args.dtypes}
    if worker is not None:
        late.update({("torch", d): worker.peak(d) for d in worker.peaks})
        worker.close()
    peak_pairs = {k: (v, late[k]) for k, v in peaks.items()}
    peaks = {k: max(pair) for k, pair in peak_pairs.items()}

    rows = {}
    for name, v in variants.items():
        med = statistics.median(times[name])
        peak = peaks[(v["lib"], v["dtype"])]
        rows[name] = dict(variant=name, dtype=v["dtype"], s_per_step=med, tokens_per_s=tokens_per_step / med,
                          mfu=flops_per_step / med / peak, first_ce=v["holder"]["first_ce"],
                          first_grad_norm=v["holder"]["first_grad_norm"],
                          first_s=v["first_s"], times=times[name])
    hf_rows = [r for n_, r in rows.items() if n_.startswith("hf")]
    best_hf = max(hf_rows, key=lambda r: r["tokens_per_s"]) if hf_rows else None
    for r in rows.values():
        r["vs_best_hf"] = r["tokens_per_s"] / best_hf["tokens_per_s"] if best_hf else float("nan")

    # Same weights, same batch: the first step's CE must agree (float32 when we ran it).
    check = "skipped (no HF)"
    hf32 = [r for r in hf_rows if r["dtype"] == "float32"]
    ours_ref = rows.get("ours float32") or rows.get(f"ours {args.dtypes[0]}")
    ok = True
    if hf32 and ours_ref:
        f32 = ours_ref["dtype"] == "float32"
        tol, gtol = (CE_RTOL, GRAD_RTOL) if f32 else (BF16_CE_RTOL, BF16_GRAD_RTOL)
        rel = max(abs(ours_ref["first_ce"] - r["first_ce"]) / abs(r["first_ce"]) for r in hf32)
        grel = max(abs(ours_ref["first_grad_norm"] - r["first_grad_norm"]) / abs(r["first_grad_norm"])
                   for r in hf32)
        ok = rel <= tol and grel <= gtol
        check = (f"{'ok' if ok else 'MISMATCH'}: first step of {ours_ref['variant']} vs HF float32 on the "
                 f"same weights: CE {ours_ref['first_ce']:.5f} vs {hf32[0]['first_ce']:.5f} (max rel diff "
                 f"{rel:.1e}, tol {tol:.0e}), grad norm {ours_ref['first_grad_norm']:.4f} vs "
                 f"{hf32[0]['first_grad_norm']:.4f} (max rel diff {grel:.1e}, tol {gtol:.0e})")
    primary = rows.get(f"ours {args.dtypes[0]}")
    result = dict(
        tokens_per_s=primary["tokens_per_s"] if primary else None,
        hf_tokens_per_s=best_hf["tokens_per_s"] if best_hf else None,
        ratio=primary["vs_best_hf"] if primary and best_hf else None,
        mfu=primary["mfu"] if primary else None, dtype=args.dtypes[0],
        hf_best=best_hf["variant"] if best_hf else None, check=check, check_ok=ok,
        batch=B, seq=T, flops_per_step=flops_per_step, head_flops_share=head_share, model=describe(cfg32), rows=list(rows.values()), failed=failed,
        peaks={f"{k[0]} {k[1]}": v for k, v in peaks.items()},
        peaks_before_after={f"{k[0]} {k[1]}": v for k, v in peak_pairs.items()}, machine=info, quick=quick)
    return result


def format_table(result: dict) -> str:
    header = ["variant", "compute", "s/step (median)", "tokens/s", "x best HF", "MFU", "first-step CE",
              "first call s"]
    rows = []
    for r in sorted(result["rows"], key=lambda r: -r["tokens_per_s"]):
        rows.append([r["variant"], r["dtype"], f"{r['s_per_step']:.3f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['vs_best_hf']:.2f}", f"{100 * r['mfu']:.1f}%", f"{r['first_ce']:.4f}",
                     f"{r['first_s']:.1f}"])
    for name, err in result["failed"].items():
        rows.append([name, "-", "failed", "-", "-", "-", "-", err.replace("|", "/")])
    return common.markdown_table(header, rows)


def summary(result: dict) -> str:
    peaks = ", ".join(f"{k} {max(v) / 1e9:,.0f} ({v[0] / 1e9:,.0f} / {v[1] / 1e9:,.0f})"
                      for k, v in result["peaks_before_after"].items())
    lines = [
        f"Model: {result['model']}; batch {result['batch']} x {result['seq']}; "
        f"{result['flops_per_step'] / 1e9:,.3f} GFLOP per step "
        f"(deepseek_jax.inspect flops_per_token x tokens; the output head is "
        f"{100 * result['head_flops_share']:.0f}% of them). Matmul peaks measured in this run, the higher "
        f"of two measurements (before / after the timed steps), GFLOP/s: {peaks}.",
        f"Correctness: {result['check']}.",
    ]
    ours = [r for r in result["rows"] if r["variant"].startswith("ours")]
    if ours:
        parts = []
        for r in ours:
            target = MFU_TARGETS.get(r["dtype"])
            vs_hf = f", {r['vs_best_hf']:.2f}x the fastest HF variant ({result['hf_best']})" if result["hf_best"] else ""
            parts.append(f"{r['variant']}: MFU {100 * r['mfu']:.1f}% of the same-run {r['dtype']} peak"
                         + (f" (target >= {100 * target:.0f}%)" if target else "") + vs_hf)
        lines.append("; ".join(parts) + (" (target >= 1.00x)." if result["hf_best"] else "."))
    return "\n\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and batch, 2 timed steps, no torch.compile")
    p.add_argument("--json", action="store_true", help="print one JSON line (tokens_per_s, hf_tokens_per_s, "
                   "ratio, mfu, dtype, ...) instead of the table")
    p.add_argument("--dtypes", help="compute dtypes of ours, first = headline (default bfloat16,float32; "
                   "--quick: bfloat16)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 5; --quick: 2)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant, the first compiles (default 2; "
                   "--quick: 1)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    p.add_argument("--no_hf", action="store_true", help="time ours only")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--results", help=f"markdown file for the section (default {common.RESULTS}; --quick: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default_malloc", action="store_true", help="glibc malloc's defaults (default: restart "
                   "with common.MALLOC_TUNABLES)")
    args = p.parse_args(argv)
    args.dtypes = (args.dtypes or ("bfloat16" if args.quick else "bfloat16,float32")).split(",")
    args.steps = args.steps or (2 if args.quick else 5)
    args.warmup = max(1, args.warmup or (1 if args.quick else 2))
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
        keys = ("tokens_per_s", "hf_tokens_per_s", "ratio", "mfu", "dtype", "hf_best", "check", "check_ok",
                "flops_per_step", "head_flops_share", "peaks", "peaks_before_after")
        print(json.dumps({k: result[k] for k in keys}))
    else:
        print(table)
        print()
        print(summary(result))
    if args.results:
        body = (f"Command: `{common.command_line(SCRIPT, argv)}`\n\n{common.machine_line(result['machine'])} "
                "Compare the ratios (measured in one run, steps interleaved; HF in a worker process), "
                "not absolute times across runs.\n\n"
                f"{table}\n\n{summary(result)}")
        common.write_section(args.results, SCRIPT, body)
        if not args.json:
            print(f"wrote the {SCRIPT} section of {args.results}")
    if not result["check_ok"]:
        raise SystemExit(f"correctness check failed: {result['check']}")
    return result


if __name__ == "__main__":
    main()
