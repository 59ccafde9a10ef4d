"""Train-step throughput and MFU on CPU: the issue-4 bench config, float32 and bfloat16.

    python experiments/benchmarks/train_step_cpu.py                   # table + RESULTS.md section
    python experiments/benchmarks/train_step_cpu.py --breakdown       # also where the time goes
    python experiments/benchmarks/train_step_cpu.py --quick --json --dtype float32   # one JSON line

Bench config (DeepSeek-V3 architecture at CPU size): hidden 256, 4 layers (the first
dense, intermediate 512), MLA with 8 heads (q_lora 128, kv_lora 64, qk_nope 32,
qk_rope 16, v_head 32), 16 routed experts top-2 + 1 shared (moe_intermediate 128),
sigmoid routing with the selection bias, vocab 32000, no MTP (as the HF reference),
batch 8 x 256, AdamW. The step is `train_step.make_train_step` exactly as the trainer
builds it (pretrain loss, bias update on, donated state).

MFU = model FLOPs per step / step time / matmul peak, the peak measured in the same run
by a jitted square matmul in the compute dtype (bfloat16 inputs accumulate in float32).
Model FLOPs per token = `deepseek_jax.inspect.model_stats(config, T)["flops_per_token"]`:
6 x activated matmul parameters (attention projections, dense MLP or router + top-k and
shared experts, output head; not the embedding lookup) + 3 x L x H x (qk_head_dim +
v_head_dim) x T for causal attention scores and values (PaLM's 12 L H Q T halved for the
causal mask). `activated_matmul_params` below recomputes it as a fallback and cross-check.

--quick: 1 timed step after the compile, small peak matmul, no RESULTS.md section unless
--results is given. --tiny: a toy shape for smoke tests.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import losses, optim, sharding, train_step  # noqa: E402
from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.layers import matmul_2d  # noqa: E402
from deepseek_jax.model import Transformer  # noqa: E402

DEFAULT_RESULTS = REPO / "experiments" / "benchmarks" / "RESULTS.md"
RESULTS_HEADER = "# Benchmark results\n\nEach benchmark script appends its own dated section; newest last.\n"

BENCH = dict(name="bench_v3_cpu", vocab_size=32000, hidden_size=256, num_hidden_layers=4, intermediate_size=512,
             max_position_embeddings=1024, attention="mla", num_attention_heads=8, q_lora_rank=128,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
             first_k_dense_replace=1, scoring_func="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
             norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True, num_mtp_layers=0)
TINY = dict(BENCH, vocab_size=512, hidden_size=64, num_hidden_layers=1, first_k_dense_replace=0,
            intermediate_size=128,
            num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=4, n_group=2, topk_group=1, moe_intermediate_size=32)


# ----- FLOPs ---------------------------------------------------------------------------------

def activated_matmul_params(c: ModelConfig) -> int:
    """Weights one token multiplies through in a forward pass (embedding lookup excluded)."""
    D, H = c.hidden_size, c.num_attention_heads
    if c.attention == "mla":
        q = D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim if c.q_lora_rank else D * H * c.qk_head_dim
        attn = (q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
                + H * c.v_head_dim * D)
    else:
        hd = c.mha_head_dim
        attn = D * H * hd + 2 * D * c.kv_heads * hd + H * hd * D
    total = c.hidden_size * c.vocab_size  # output head
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            ffn = D * c.n_routed_experts + 3 * D * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
        else:
            ffn = 3 * D * c.intermediate_size
        total += attn + ffn
    return total


def train_flops_per_token(c: ModelConfig, seq_len: int) -> tuple[float, str]:
    """(training FLOPs per token, where the number came from).

    deepseek_jax.inspect's count (read off the parameter tree) when it is importable,
    else the same convention from `activated_matmul_params`: 6N + causal attention
    3 L H (d_qk + d_v) T. MTP is not in the bench config, so its FLOPs do not apply.
    """
    try:
        from deepseek_jax import inspect as inspect_lib  # another issue's module
        return float(inspect_lib.model_stats(c, seq_len)["flops_per_token"]), "deepseek_jax.inspect.model_stats"
    except (ImportError, AttributeError, KeyError):
        pass
    v = c.v_head_dim if c.attention == "mla" else c.mha_head_dim
    qk = c.qk_head_dim if c.attention == "mla" else c.mha_head_dim
    attn = 3 * seq_len * c.num_attention_heads * (qk + v) * c.num_hidden_layers
    return 6.0 * activated_matmul_params(c) + attn, "computed in the bench (6N + causal attention)"


# ----- timing --------------------------------------------------------------------------------

def _best_s(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def matmul_peak(dtype: str, n: int, repeats: int) -> float:
    """FLOP/s of a jitted n x n x n matmul in `dtype` (bfloat16 accumulates in float32)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))
    best, _ = _best_s(lambda: f(a, a), repeats)
    return 2.0 * n**3 / best


def make_batch(c: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return dict(tokens=ids[:, :-1], targets=ids[:, 1:], loss_mask=np.ones((batch, seq_len), np.float32),
                segment_ids=np.ones((batch, seq_len), np.int32),
                positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy())


def run_dtype(shape: dict, dtype: str, batch: int, seq_len: int, steps: int, breakdown: bool) -> dict:
    c = ModelConfig.from_dict(dict(shape, dtype=dtype))
    model = Transformer(c)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    rules = sharding.logical_rules()
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=1000))
    state = train_step.create_train_state(model, optimizer, mesh, rules, seed=0)
    loss_fn = train_step.bind_loss("pretrain", model, losses.LossConfig())
    step = train_step.make_train_step(model, loss_fn, optimizer, mesh, rules, bias_update_rate=1e-3)
    data = make_batch(c, batch, seq_len)
    start = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = step(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = batch * seq_len
    flops_tok, flops_src = train_flops_per_token(c, seq_len)
    out = dict(dtype=dtype, step_s=step_s, tokens_per_s=tokens / step_s, compile_s=compile_s,
               flops_per_step=flops_tok * tokens, flops_source=flops_src, loss=float(m["loss"]),
               head_flops_fraction=6.0 * c.hidden_size * c.vocab_size / flops_tok)
    if breakdown:
        out["breakdown"] = time_parts(model, c, state, data, loss_fn, optimizer, steps)
    return out


def time_parts(model, c, state, data, loss_fn, optimizer, repeats) -> dict:
    """Seconds of the step's pieces, each jitted alone (overlap means they need not add up)."""
    params, batch = state.params, jax.tree.map(jnp.asarray, data)
    fwd = jax.jit(lambda p, b: loss_fn(p, b, None)[0])
    fwd_bwd = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]))
    trunk = jax.jit(lambda p, b: model.apply({"params": p}, b["tokens"], positions=b["positions"],
                                            segment_ids=b["segment_ids"]).hidden)
    h = trunk(params, batch)
    W = params["lm_head"]["kernel"]
    dt = jnp.dtype(c.dtype)

    def head_ce(h, W, targets):
        logits = matmul_2d(h.astype(dt), W.astype(dt), 1)  # as the model's lm_head
        return -jnp.mean(losses.token_logprobs(logits, targets)[0])

    head = jax.jit(jax.value_and_grad(head_ce, argnums=(0, 1)))
    grads = jax.tree.map(jnp.zeros_like, params)
    opt = jax.jit(lambda g, s, p: optimizer.update(g, s, p))
    parts = {"forward (loss)": lambda: fwd(params, batch),
             "forward + backward": lambda: fwd_bwd(params, batch),
             "output head + CE, fwd + bwd": lambda: head(h, W, batch["targets"]),
             "optimizer update": lambda: opt(grads, state.opt_state, params)}
    out = {}
    for name, fn in parts.items():
        jax.block_until_ready(fn())
        out[name] = _best_s(fn, max(repeats, 2))[1]
    return out


# ----- reporting -----------------------------------------------------------------------------

def table(results, peaks) -> str:
    lines = ["| dtype | step (s) | tokens/s | model TFLOP/step | matmul peak (GFLOP/s) | MFU | compile (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['dtype']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['flops_per_step'] / 1e12:.3f} "
                     f"| {peaks[r['dtype']] / 1e9:,.0f} | {100 * r['mfu']:.1f}% | {r['compile_s']:.1f} |")
    for r in results:
        if "breakdown" in r:
            lines += ["", f"Where the {r['dtype']} step goes (median s, each piece jitted alone):", "",
                      "| piece | s | share of step |", "|---|---|---|"]
            for name, s in r["breakdown"].items():
                lines.append(f"| {name} | {s:.3f} | {100 * s / r['step_s']:.0f}% |")
    return "\n".join(lines)


def write_section(path: pathlib.Path, command: str, body: str, results) -> None:
    text = path.read_text() if path.exists() else RESULTS_HEADER
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"\n## train_step_cpu.py, {now}\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} ({jax.default_backend()}), load average {load:.1f} at the end "
            "(other jobs share the cores).\n"
            f"Command: `{command}`\n"
            f"FLOPs: {results[0]['flops_source']}; output head = "
            f"{100 * results[0]['head_flops_fraction']:.0f}% of the model FLOPs.\n\n")
    path.write_text(text.rstrip("\n") + "\n" + head + body + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both")
    p.add_argument("--quick", action="store_true", help="1 timed step, small peak matmul")
    p.add_argument("--tiny", action="store_true", help="toy shape (smoke tests)")
    p.add_argument("--json", action="store_true", help="one JSON line per dtype instead of the table")
    p.add_argument("--breakdown", action="store_true", help="also time the step's pieces")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5, 1 with --quick)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--results", type=pathlib.Path, default=None,
                   help=f"markdown file to append a section to (default {DEFAULT_RESULTS} unless --quick)")
    args = p.parse_args(argv)
    shape = TINY if args.tiny else BENCH
    batch = args.batch or (2 if args.tiny else 8)
    seq_len = args.seq_len or (16 if args.tiny else 256)
    steps = args.steps or (1 if args.quick else 5)
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    peak_n = 256 if (args.quick or args.tiny) else 2048
    results, peaks = [], {}
    for dt in dtypes:
        r = run_dtype(shape, dt, batch, seq_len, steps, args.breakdown)
        peaks[dt] = matmul_peak(dt, peak_n, 3 if args.quick else 10)
        r["mfu"] = r["flops_per_step"] / r["step_s"] / peaks[dt]
        r["peak_flops"] = peaks[dt]
        results.append(r)
    if args.json:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "breakdown"} | (
                {"breakdown": r["breakdown"]} if "breakdown" in r else {})))
    else:
        print(table(results, peaks))
    target = args.results or (None if args.quick else DEFAULT_RESULTS)
    if target is not None:
        command = "python experiments/benchmarks/train_step_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(pathlib.Path(target), command.strip(), table(results, peaks), results)


if __name__ == "__main__":
    main()
