"""Smoke runs of the benchmark scripts' --quick paths, and common.write_section.

Each script runs as a subprocess, exactly as a user runs it, on its tiny --quick shape;
sections go to a temporary file, never to the repository's RESULTS.md. The persistent
compilation cache (.jax_cache, shared with conftest) makes reruns mostly compile-free.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np


BENCH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
REPO = BENCH.parents[1]
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
from tests.xla_flags import without  # noqa: E402


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
    # The scripts run on one device, as a user runs them (conftest asks for 8 virtual ones); a
    # smoke run is mostly XLA compile time of tiny programs, so conftest's FAST_COMPILE stays.
    env["XLA_FLAGS"] = without(env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count")
    return env


def _run(script, *args, timeout=900):  # generous: the CI machines are shared
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _has_hf():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ----- common.write_section ----------------------------------------------------------------------

def test_write_section_replaces_its_own_section_and_keeps_others(tmp_path):
    path = tmp_path / "RESULTS.md"
    common.write_section(path, "a.py", "first a", title_suffix="day 1")
    # A section in gpu_routing.py's appended style, written by another script.
    path.write_text(path.read_text() + "\n## gpu_routing.py, day 1\n\nrouting table\n")
    common.write_section(path, "b.py", "first b", title_suffix="day 1")
    common.write_section(path, "a.py", "second a", title_suffix="day 2")
    common.write_section(path, "gpu_routing.py", "routing again", title_suffix="day 2")
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## a.py, day 2", "## gpu_routing.py, day 2", "## b.py, day 1"]
    assert "first a" not in text and "second a" in text and "first b" in text
    assert "routing table" not in text and "routing again" in text
    # Keys are whole names: "a.py" must not swallow "a.py (bfloat16)".
    common.write_section(path, "a.py (bfloat16)", "bf16 a", title_suffix="day 3")
    common.write_section(path, "a.py", "third a", title_suffix="day 3")
    text = path.read_text()
    assert "bf16 a" in text and "third a" in text and text.count("## a.py") == 2


def test_alternate_interleaves_rotates_and_times_every_variant():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = common.alternate(fns, steps=4, warmup=1)
    # warm-up in order, then rounds starting at a, b, c, a: no variant always follows the same one
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_cpu_model_names_the_bf16_features(tmp_path):
    """Two CPUs with the same model name differ 4x in bf16 GEMM speed: RESULTS.md says which."""
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert common.cpu_model(str(info)) == "Intel(R) Xeon(R) Processor (avx512_bf16, amx_bf16)"
    info.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert common.cpu_model(str(info)) == "AMD EPYC 9B14 (avx512_bf16)"
    info.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f\n")
    assert common.cpu_model(str(info)) == "Intel(R) Xeon(R) Processor (no native bf16)"


def test_matmul_peak_is_positive_for_both_dtypes():
    for dtype in ("float32", "bfloat16"):
        assert common.matmul_peak_flops(dtype, n=128, repeats=2) > 0


# ----- the scripts' --quick paths ----------------------------------------------------------------

def test_train_step_vs_hf_quick_json_and_section(tmp_path):
    """With torch + transformers: ours vs HF on the same weights (checked); without: ours only."""
    results = tmp_path / "RESULTS.md"
    hf_args = [] if _has_hf() else ["--no_hf"]
    out = json.loads(_run("train_step_vs_hf.py", "--quick", "--json", "--results", str(results),
                          *hf_args).strip().splitlines()[-1])
    assert {"tokens_per_s", "hf_tokens_per_s", "ratio", "mfu", "dtype"} <= set(out)
    assert out["dtype"] == "bfloat16" and out["tokens_per_s"] > 0 and out["mfu"] > 0
    B, T = 2, 32  # the --quick batch
    np.testing.assert_allclose(out["head_flops_share"], 6 * 64 * 512 * B * T / out["flops_per_step"], rtol=1e-9)
    # MFU is divided by the higher of the peaks measured before and after the timed steps.
    before, after = out["peaks_before_after"]["jax bfloat16"]
    assert out["peaks"]["jax bfloat16"] == max(before, after) and min(before, after) > 0
    np.testing.assert_allclose(out["mfu"] * max(before, after) * B * T / out["tokens_per_s"],
                               out["flops_per_step"], rtol=1e-9)
    text = results.read_text()
    assert "## train_step_vs_hf.py, " in text and "| ours bfloat16 |" in text
    if _has_hf():
        assert out["hf_tokens_per_s"] > 0 and out["ratio"] > 0
        assert out["check_ok"] and out["check"].startswith("ok"), out["check"]  # first-step CE, grad norm
        assert "| hf grouped_mm |" in text and "| hf eager |" in text


def test_bench_model_flops_match_the_built_model():
    """The FLOPs every train-step MFU divides by (deepseek_jax.inspect on the bench config)
    against the parameter tree actually built: 6 x activated matmul weights (all but the
    embedding and the routed experts a token skips) + causal attention 3 L H (d_qk + d_v) T."""
    import jax
    from flax import linen as nn

    import train_step_vs_hf as bench
    from deepseek_jax import inspect as ds_inspect, sharding
    from deepseek_jax.model import Transformer

    c = bench.model_config(quick=False)
    params = nn.meta.unbox(sharding.abstract_params(Transformer(c)))
    flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    size = lambda shape: int(np.prod(shape))  # noqa: E731
    matmul = sum(size(s) for k, s in flat.items() if len(s) >= 2 and "embedding" not in k)
    routed = sum(size(s) for k, s in flat.items() if len(s) == 3 and "shared" not in k
                 and any(w in k for w in ("gate_proj", "up_proj", "down_proj")))
    activated = matmul - routed + routed * c.num_experts_per_tok // c.n_routed_experts
    T = bench.BENCH_SEQ
    attn = 3 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * T
    flops = ds_inspect.model_stats(c, seq_len=T)["flops_per_token"]
    assert flops == 6 * activated + attn
    # The output head dominates at vocab 32000 (issue 4 quotes ~77%).
    assert 0.7 < 6 * c.hidden_size * c.vocab_size / flops < 0.85


def test_step_breakdown_quick_json():
    out = json.loads(_run("step_breakdown.py", "--quick", "--json").strip().splitlines()[-1])
    parts = out["parts_ms"]
    assert {"attention", "MoE router", "MoE experts", "head + CE", "optimizer", "full step"} <= set(parts)
    assert out["tokens_per_s"] > 0 and out["xla_flops"] > 0
    assert parts["forward only (whole model, loss)"] > 0
    np.testing.assert_allclose(out["mfu"] * max(out["peak_before_after"]) * out["step_s"], out["model_flops"],
                               rtol=1e-9)


def test_gpu_suite_quick_writes_a_checked_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run("gpu_suite.py", "--quick", "--results", str(results))
    text = results.read_text()
    assert "## gpu_suite.py, " in text and "CPU smoke run" in text
    parts = {"kernels", "train", "gemm", "attention", "routing", "decode"}
    rows = [line for line in text.splitlines() if line.split("|")[1:2] and line.split("|")[1].strip() in parts]
    assert {r.split("|")[1].strip() for r in rows} == parts
    assert all("| ok |" in r for r in rows), out
    assert "Targets: train MFU >= 0.35: " in text
