"""experiments/benchmarks/moe_scaling.py --quick --json runs, times every variant and reports ratios.

A subprocess, so the command line runs exactly as a user runs it; --quick without
--results leaves RESULTS.md alone. Oracle for the ratios: recomputed from the reported times.
"""
import json
import os
import pathlib
import subprocess
import sys

from tests.xla_flags import FAST_COMPILE

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "moe_scaling.py"


def test_quick_json_reports_every_variant_with_consistent_ratios():
    # The tests' persistent compilation cache (conftest.py) makes reruns fast.
    cache = pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"
    # One device, as a user runs it; FAST_COMPILE: the run is mostly compiling tiny programs.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(FAST_COMPILE),
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {(r["dispatch"], r["E"]): r for r in out["rows"]}
    assert set(rows) == {("swiglu", 0), ("dropless", 4), ("capacity", 4), ("dense", 4), ("dropless", 8)}
    swiglu, first = rows[("swiglu", 0)]["us_per_token"], rows[("dropless", 4)]["us_per_token"]
    for key, r in rows.items():
        assert r["us_per_token"] > 0
        if key[0] != "swiglu":
            assert abs(r["vs_first_E"] - r["us_per_token"] / first) < 1e-9
            assert abs(r["vs_swiglu"] - r["us_per_token"] / swiglu) < 1e-9
    v = out["verdict"]
    assert v["worst_vs_first_E"] == max(r["vs_first_E"] for k, r in rows.items() if k[0] == "dropless")
    assert out["machine"]["cpus"] >= 1 and out["machine"]["jax"]
