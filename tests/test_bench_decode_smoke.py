"""experiments/benchmarks/decode.py --quick --json runs, its absorbed and naive decodes agree,
and it writes its section (to a temporary RESULTS.md, never the repository's).

A subprocess, so the command line runs exactly as a user types it; it shares the tests'
persistent compilation cache, since the run is mostly compile time.
"""
import json
import os
import pathlib
import subprocess
import sys

from tests.xla_flags import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "benchmarks" / "decode.py"


def test_quick_json_run(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    # One device, as a user's run; FAST_COMPILE: the run is mostly compiling tiny programs.
    env["XLA_FLAGS"] = " ".join(FAST_COMPILE)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", "--results", str(results)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = {r["impl"]: r for r in rows if r["kind"] == "step"}
    assert set(steps) == {"absorbed", "naive"} and steps["absorbed"]["context"] == 64
    # Oracle: the naive decode re-expands K/V from the same latent cache.
    assert steps["absorbed"]["max_logit_diff"] <= 1e-4
    assert all(r["tokens_per_s"] > 0 for r in rows) and any(r["kind"] == "rollout" for r in rows)
    text = results.read_text()
    assert text.startswith("# Benchmark results") and "## decode.py, " in text
    assert "| step | absorbed | 2 | 64 |" in text


def test_rollout_quick_json_run(tmp_path):
    """--rollout --quick: every sampler path runs, greedy rollouts agree across paths and sampled ones
    across the paths without MTP (the oracle is the plain sampler), and the JSON has the contract's keys (HF's peer is skipped here: loading
    transformers alone costs more than the run)."""
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    env["XLA_FLAGS"] = " ".join(FAST_COMPILE)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rollout", "--quick", "--no_hf", "--json", "--results",
                           str(results)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"plain_tokens_per_s", "best_tokens_per_s", "speedup", "acceptance", "greedy_identical",
            "hf_tokens_per_s"} <= set(out)
    assert out["greedy_identical"] is True and out["sampled_identical"] is True and out["hf_tokens_per_s"] is None
    assert set(out["paths"]) == {"plain", "shared_prefill", "compact", "mtp", "shared+compact", "mtp+shared+compact"}
    assert out["best_tokens_per_s"] >= out["plain_tokens_per_s"] > 0 and 0 <= out["acceptance"] <= 1
    assert "## decode.py --rollout, " in results.read_text()
