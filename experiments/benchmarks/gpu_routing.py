"""Routing kernel vs jnp reference at DeepSeek-V3 / V2 shapes: correctness and time.

    python experiments/benchmarks/gpu_routing.py                 # GPU: T = 4k, 16k, 64k
    python experiments/benchmarks/gpu_routing.py --quick         # CPU: tiny T, interpret mode

For each shape it draws fresh random logits (and bias), checks `route` against
`route_reference` (same expert sets per token, weights within 1e-5), then times the
forward and forward+backward of both (median of --repeats runs, block_until_ready),
prints a table and replaces its dated section of experiments/benchmarks/RESULTS.md.
Near-tied tokens may legitimately flip between two float implementations (the GPU's
exp differs from XLA's in the last bit), so up to 1e-3 of the rows may differ in their
expert set; weights are compared on the rows that agree. --quick writes a section only
when --results is given, so smoke runs leave RESULTS.md alone.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import routing  # noqa: E402

DEFAULT_RESULTS = REPO / "experiments" / "benchmarks" / "RESULTS.md"
MODELS = {  # REFERENCES.md: V3 sigmoid + bias + top-2-sum groups, V2 softmax + max groups
    "V3": dict(E=256, top_k=8, n_groups=8, topk_groups=4, score_func="sigmoid", group_score="top2_sum",
               norm_topk=True, scale=2.5, bias=True),
    "V2": dict(E=160, top_k=6, n_groups=8, topk_groups=3, score_func="softmax", group_score="max",
               norm_topk=False, scale=16.0, bias=False),
}
MAX_FLIPPED_ROWS = 1e-3
WEIGHT_ATOL = 1e-5


def _median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _check(w, ids, w_ref, ids_ref):
    """(fraction of rows whose expert sets differ, max |dw| over the rows that agree)."""
    order, order_ref = np.argsort(ids, 1), np.argsort(ids_ref, 1)
    ids_s, ids_ref_s = np.take_along_axis(ids, order, 1), np.take_along_axis(ids_ref, order_ref, 1)
    same_rows = (ids_s == ids_ref_s).all(1)
    dw = np.abs(np.take_along_axis(w, order, 1) - np.take_along_axis(w_ref, order_ref, 1))[same_rows]
    return 1.0 - same_rows.mean(), float(dw.max()) if dw.size else 0.0


def bench_one(model, T, block_ts, *, interpret, repeats, seed):
    """Rows for the reference and for the kernel at each block_t, on one fresh input."""
    cfg = dict(MODELS[model])
    E, has_bias = cfg.pop("E"), cfg.pop("bias")
    key_x, key_b, key_g = jax.random.split(jax.random.PRNGKey(seed), 3)
    logits = jax.random.normal(key_x, (T, E), jnp.float32)
    bias = 0.05 * jax.random.normal(key_b, (E,)) if has_bias else None
    cot = jax.random.normal(key_g, (T, cfg["top_k"]))
    impls = [("reference", "-", routing.route_reference)]
    impls += [("pallas", b, functools.partial(routing.route, interpret=interpret,
                                              block_sizes=routing.BlockSizes(block_t=b))) for b in block_ts]
    rows, ref_out = [], None
    for name, block_t, fn in impls:
        fwd = jax.jit(lambda x, b, fn=fn: fn(x, b, **cfg))
        fwd_bwd = jax.jit(jax.value_and_grad(lambda x, b, c, fn=fn: (fn(x, b, **cfg)[0] * c).sum()))
        out = [np.asarray(a) for a in fwd(logits, bias)]
        ref_out = ref_out or out
        flipped, max_dw = _check(*out, *ref_out)
        ok = flipped <= MAX_FLIPPED_ROWS and max_dw <= WEIGHT_ATOL
        rows.append(dict(model=model, T=T, impl=name, block_t=block_t,
                         fwd_ms=_median_ms(fwd, (logits, bias), repeats),
                         fwd_bwd_ms=_median_ms(fwd_bwd, (logits, bias, cot), repeats),
                         flipped_rows=flipped, max_dw=max_dw, check="ok" if ok else "MISMATCH"))
    return rows


def format_table(rows):
    head = "| model | T | impl | block_t | fwd ms | fwd+bwd ms | rows with other experts | max abs dw | check |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['T']} | {r['impl']} | {r['block_t']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['flipped_rows']:.2e} | {r['max_dw']:.1e} | {r['check']} |")
    return "\n".join(lines)


def append_results(path, table, args, interpret):
    """Replaces this script's section of the markdown file at `path` (common.write_section)."""
    import common

    device = jax.devices()[0]
    body = (f"Device: {device.platform} {device.device_kind}; jax {jax.__version__}; "
            f"{'interpret mode' if interpret else 'compiled (Triton lowering)'}; median of {args.repeats}; "
            f"command: `python experiments/benchmarks/gpu_routing.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
    common.write_section(path, "gpu_routing.py", body)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny T in interpret mode (CPU smoke run)")
    parser.add_argument("--tokens", help="comma-separated T (default 4096,16384,65536; --quick: 37)")
    parser.add_argument("--block_ts", help="comma-separated kernel block_t (default 8,16,32; --quick: 16)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 20; --quick: 2)")
    parser.add_argument("--results", help=f"markdown file whose gpu_routing.py section is replaced (default {DEFAULT_RESULTS}; --quick: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.tokens = [int(t) for t in (args.tokens or ("37" if quick else "4096,16384,65536")).split(",")]
    args.block_ts = [int(b) for b in (args.block_ts or ("16" if quick else "8,16,32")).split(",")]
    args.repeats = args.repeats or (2 if quick else 20)
    if args.results is None and not quick:
        args.results = str(DEFAULT_RESULTS)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.quick:
        raise SystemExit(f"No GPU (jax backend is {jax.default_backend()!r}). "
                         "Run with --quick for the CPU interpret-mode smoke run.")
    interpret = not on_gpu
    rows = []
    for model in MODELS:
        for i, T in enumerate(args.tokens):
            rows += bench_one(model, T, args.block_ts, interpret=interpret, repeats=args.repeats,
                              seed=args.seed + i)
    table = format_table(rows)
    print(table)
    if args.results:
        append_results(args.results, table, args, interpret)
        print(f"wrote the gpu_routing.py section of {args.results}")
    if any(r["check"] != "ok" for r in rows):
        raise SystemExit("kernel and reference disagree: see the check column")
    return rows


if __name__ == "__main__":
    main()
