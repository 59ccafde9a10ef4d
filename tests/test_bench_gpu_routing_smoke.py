"""experiments/benchmarks/gpu_routing.py --quick runs on CPU, passes its own check, writes its section.

Run as a subprocess so the command line, argument defaults and the file it writes its section to
are exercised exactly as a user runs them; the section goes to a temporary file, never
to the repository's RESULTS.md.
"""
import os
import pathlib
import subprocess
import sys

from tests.xla_flags import FAST_COMPILE

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "gpu_routing.py"


def test_quick_run_checks_kernel_and_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    # One device, as a user runs it; FAST_COMPILE: the run is mostly compiling tiny programs.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(FAST_COMPILE))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--results", str(results)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert "## gpu_routing.py, " in text and "interpret mode" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| V")]
    assert len(table_rows) == 4  # V3 and V2, reference and kernel
    assert all(line.rstrip().endswith("| ok |") for line in table_rows)
