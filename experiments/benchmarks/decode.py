"""Decode with a KV cache: absorbed vs naive MLA per step at 1k / 4k context, and rollout tokens/s.

    python experiments/benchmarks/decode.py                  # small V3-like model, CPU ok
    python experiments/benchmarks/decode.py --quick --json   # smoke run (tests), JSON rows on stdout

Per context length S it fills a cache with S random latent entries per row, then times
`--steps` decode steps inside one jitted `lax.scan` (the cache is updated in place, as in
the sampler's loop) for the absorbed decode (attention over the [C + R] latent) and the
naive one (K/V re-expanded from the latent for every slot each step), checks both give the
same logits, and reports ms per step, tokens/s (batch / step time) and the ratio. Then it
runs `rl.sampler.Sampler` end to end (prefill + while_loop) and reports rollout tokens/s.
The dated decode.py section of experiments/benchmarks/RESULTS.md is replaced (--quick: only
with --results).

`--rollout` instead times a GRPO-shaped rollout with the plain sampler, shared prefill,
finished-row compaction, MTP speculative decoding and combinations, against HF `generate`
(decode_rollout.py); `--json` then prints one object with `plain_tokens_per_s`,
`best_tokens_per_s`, `speedup`, `acceptance`, `greedy_identical`, `sampled_identical`,
`hf_tokens_per_s`.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepseek_jax import kv_cache  # noqa: E402
from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.model import Transformer, init_params  # noqa: E402
from deepseek_jax.rl.sampler import Sampler  # noqa: E402

DEFAULT_RESULTS = REPO / "experiments" / "benchmarks" / "RESULTS.md"
# V3's shape ratios shrunk: C = 4 x qk_nope, R = qk_nope / 2, sigmoid group routing, first layer dense.
SMALL_V3 = dict(vocab_size=2048, hidden_size=512, num_hidden_layers=4, intermediate_size=1024,
                max_position_embeddings=8192, attention="mla", num_attention_heads=8, q_lora_rank=192,
                kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
                first_k_dense_replace=1, scoring_func="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True)
# --quick: one dense MLA layer, so the smoke run is mostly compile time of the same code paths.
TINY = dict(SMALL_V3, vocab_size=264, hidden_size=64, num_hidden_layers=1, intermediate_size=128, q_lora_rank=32,
            kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=4,
            n_routed_experts=0, first_k_dense_replace=0)
LOGITS_ATOL = 1e-3


def _median_s(fn, repeats):
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _filled_cache(config, batch, context, steps, key):
    """A cache whose first `context` slots hold random latents (values do not change the cost)."""
    cache = kv_cache.init_cache(config, batch, context + steps)
    layers = []
    for i, layer in enumerate(cache.layers):
        layers.append({k: v.at[:, :context].set(jax.random.normal(jax.random.fold_in(key, 2 * i + j),
                                                                  v[:, :context].shape, v.dtype))
                       for j, (k, v) in enumerate(sorted(layer.items()))})
    valid = jnp.arange(context + steps)[None] < context
    return cache.replace(layers=tuple(layers), valid=jnp.broadcast_to(valid, (batch, context + steps)),
                         index=jnp.int32(context))


def bench_decode_step(model, params, batch, context, steps, repeats, seed):
    """Rows: ms per decode step for absorbed and naive MLA at `context` cached tokens."""
    cache = _filled_cache(model.config, batch, context, steps, jax.random.key(seed))
    tokens_SxB = jax.random.randint(jax.random.key(seed + 1), (steps, batch), 0, model.config.vocab_size)

    def run(absorbed):
        @jax.jit
        def scan_steps(params, cache, tokens_SxB):
            def step(cache, token_B):
                out, cache = model.apply({"params": params}, token_B[:, None], cache=cache, absorbed=absorbed)
                return cache, out.logits[:, 0]
            return jax.lax.scan(step, cache, tokens_SxB)[1]
        return scan_steps

    fns = {name: run(name == "absorbed") for name in ("absorbed", "naive")}
    logits = {name: fn(params, cache, tokens_SxB) for name, fn in fns.items()}
    max_diff = float(jnp.abs(logits["absorbed"] - logits["naive"]).max())
    rows = []
    for name, fn in fns.items():
        sec = _median_s(lambda: fn(params, cache, tokens_SxB), repeats) / steps
        rows.append(dict(kind="step", impl=name, batch=batch, context=context, ms_per_step=1e3 * sec,
                         tokens_per_s=batch / sec, max_logit_diff=max_diff,
                         check="ok" if max_diff <= LOGITS_ATOL else "MISMATCH"))
    naive = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    rows[0]["naive_over_absorbed"] = rows[1]["naive_over_absorbed"] = naive
    return rows


def bench_rollout(model, params, batch, prompt_len, new_tokens, repeats, seed, impls=("absorbed", "naive")):
    """Rows: Sampler.generate tokens/s (prefill + decode loop, no stop tokens) per MLA decode."""
    prompts = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0, model.config.vocab_size)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    rows = []
    for name in impls:
        sampler = Sampler(model, prompt_len, new_tokens, absorbed=name == "absorbed")
        sec = _median_s(lambda: sampler.generate(params, prompts, jax.random.key(seed), prompt_lengths=lengths,
                                                 temperature=1.0).tokens, repeats)
        rows.append(dict(kind="rollout", impl=name, batch=batch, context=prompt_len + new_tokens,
                         ms_per_step=1e3 * sec / new_tokens, tokens_per_s=batch * new_tokens / sec,
                         max_logit_diff=0.0, check="ok"))
    return rows


def _macs(c):
    """Per-slot attention multiply-adds of one decode step: scores + latent sum vs expand + attend."""
    C, H, N, R, A = c.kv_lora_rank, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    return H * (2 * C + R), C * H * (N + A) + H * (N + R + A)


def format_table(rows, config):
    lines = [f"KV cache: {kv_cache.bytes_per_token(config, 'bfloat16')} bytes/token in bf16 "
             f"((kv_lora {config.kv_lora_rank} + rope {config.qk_rope_head_dim}) x {config.num_hidden_layers} "
             "layers x 2)",
             f"Attention MACs per cached token, layer and row: absorbed H(2C+R) = {_macs(config)[0]}, naive "
             f"CH(N+A) + H(N+R+A) = {_macs(config)[1]} ({_macs(config)[1] / _macs(config)[0]:.1f}x)", "",
             "| kind | MLA decode | batch | context | ms / step | tokens/s | naive / absorbed | max dlogit | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['naive_over_absorbed']:.2f}x" if "naive_over_absorbed" in r else "-"
        lines.append(f"| {r['kind']} | {r['impl']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {r['max_logit_diff']:.1e} | {r['check']} |")
    return "\n".join(lines)


def append_results(path, table, args, config):
    """Replaces this script's section of the markdown file at `path` (common.write_section)."""
    import common

    device = jax.devices()[0]
    body = (f"Device: {device.platform} {device.device_kind} ({platform.processor() or platform.machine()}, "
            f"{jax.local_device_count()} jax device(s)); jax {jax.__version__}; {config.dtype}; "
            f"model: {'TINY' if args.quick else 'SMALL_V3'} ({config.num_hidden_layers} layers, "
            f"D {config.hidden_size}, H {config.num_attention_heads}, C {config.kv_lora_rank}, "
            f"R {config.qk_rope_head_dim}, E {config.n_routed_experts}); median of {args.repeats}; "
            f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; command: "
            f"`python experiments/benchmarks/decode.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
    common.write_section(path, "decode.py", body)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and contexts (smoke run)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.add_argument("--contexts", help="comma-separated cached tokens (default 1024,4096; --quick: 64)")
    parser.add_argument("--batch", type=int, help="rows decoded together (default 4; --quick: 2)")
    parser.add_argument("--steps", type=int, help="decode steps per timed scan (default 8; --quick: 2)")
    parser.add_argument("--new_tokens", type=int, help="rollout tokens per row (default 128; --quick: 8)")
    parser.add_argument("--prompt_len", type=int, help="rollout prompt length (default 64; --quick: 8)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5; --quick: 1)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--results", help=f"markdown file whose decode.py section is replaced (default {DEFAULT_RESULTS}; --quick: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollout", action="store_true", help="GRPO-shaped rollout: sampler paths vs HF generate")
    parser.add_argument("--policy", help="--rollout: a training workdir to load (default: train r1_tiny briefly)")
    parser.add_argument("--train_steps", type=int, default=300, help="--rollout: pretraining steps of the policy")
    parser.add_argument("--prompts", type=int,
                        help="--rollout: prompts per rollout (default: the demo's GRPO prompts_per_step; --quick: 2)")
    parser.add_argument("--threads", type=int, default=2, help="--rollout: torch threads for HF generate")
    parser.add_argument("--no_hf", action="store_true", help="--rollout: skip the HF generate peer")
    args = parser.parse_args(argv)
    q = args.quick
    args.prompts = args.prompts or (2 if q else None)
    args.contexts = [int(t) for t in (args.contexts or ("64" if q else "1024,4096")).split(",")]
    args.batch = args.batch or (2 if q else 4)
    args.steps = args.steps or (2 if q else 8)
    args.new_tokens = args.new_tokens or (8 if q else 128)
    args.prompt_len = args.prompt_len or (8 if q else 64)
    args.repeats = args.repeats or (1 if q else (7 if args.rollout else 5))
    if args.results is None and not q:
        args.results = str(DEFAULT_RESULTS)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.rollout:
        return main_rollout(args)
    config = ModelConfig(**(TINY if args.quick else SMALL_V3), dtype=args.dtype)
    model = Transformer(config)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(args.seed))
    rows = []
    for i, context in enumerate(args.contexts):
        rows += bench_decode_step(model, params, args.batch, context, args.steps, args.repeats, args.seed + i)
    # --quick times the absorbed rollout only: each Sampler is one more compile of the model.
    rows += bench_rollout(model, params, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.seed,
                          ("absorbed",) if args.quick else ("absorbed", "naive"))
    table = format_table(rows, config)
    print(json.dumps(rows) if args.json else table)
    if args.results:
        append_results(args.results, table, args, config)
        print(f"wrote the decode.py section of {args.results}", file=sys.stderr)
    if any(r["check"] != "ok" for r in rows):
        raise SystemExit("absorbed and naive decode disagree: see the check column")
    return rows


def main_rollout(args):
    import common
    import decode_rollout

    summary, body = decode_rollout.bench(args)
    print(json.dumps(summary) if args.json else body)
    if args.results:
        common.write_section(args.results, "decode.py --rollout", body)
        print(f"wrote its section of {args.results}", file=sys.stderr)
    if not summary["greedy_identical"]:
        raise SystemExit("greedy rollouts differ between sampler paths: see greedy_identical")
    return summary


if __name__ == "__main__":
    main()
