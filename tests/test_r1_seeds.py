"""experiments/r1_seeds.py's table and curves, on seed workdirs written here (the pipeline
itself is `make demo`'s job, far too slow for the suite). Oracles: numpy's mean and sample
standard deviation, and the metrics rows the curves are read from."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "r1_seeds.py"


def _load():
    spec = importlib.util.spec_from_file_location("r1_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_seed(root: pathlib.Path, seed: int, sft: float, grpo: float, evals: dict) -> None:
    (root / f"seed_{seed}" / "grpo").mkdir(parents=True)
    summary = {"sft_accuracy": sft, "grpo_accuracy": grpo, "student_accuracy": grpo - 0.1,
               "sft_completion_length": 7.0, "grpo_completion_length": 27.5,
               "wall_seconds": 900.0 + seed, "heldout_size": 500}
    (root / f"seed_{seed}" / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": 5, "reward_mean": 0.3}] + [{"step": s, "eval/accuracy": a} for s, a in evals.items()]
    (root / f"seed_{seed}" / "grpo" / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")


def test_table_and_curves_from_finished_seeds(tmp_path):
    seeds = {3: (0.05, 0.93, {10: 0.9, 20: 0.93}), 7: (0.10, 0.80, {10: 0.7, 20: 0.8}),
             8: (0.02, 0.88, {10: 0.85, 20: 0.88})}
    for seed, (sft, grpo, evals) in seeds.items():
        _fake_seed(tmp_path, seed, sft, grpo, evals)
    r1_seeds = _load()
    # A finished seed (its summary.json exists) is read, not rerun: no pipeline may start.
    results = {s: r1_seeds.run_seed(s, str(tmp_path), "unused", []) for s in seeds}
    assert results[3]["curve"] == [(0, 0.05), (10, 0.9), (20, 0.93)]
    text = r1_seeds.table(results, "test machine")
    gains = np.array([100 * (g - s) for s, g, _ in seeds.values()])
    mean_row = [line for line in text.splitlines() if line.startswith("| mean")][0]
    assert f"{gains.mean():.1f} +- {gains.std(ddof=1):.1f}" in mean_row
    assert "| 7 | 10.0 | 80.0 | +70.0 | 70.0 | 7.0 -> 27.5 | 907 |" in text
    assert "test machine" in text and "500 problems" in text


def test_cli_writes_table_json_and_figure_and_rejects_bad_seeds(tmp_path):
    _fake_seed(tmp_path, 0, 0.08, 0.75, {10: 0.7})
    _fake_seed(tmp_path, 1, 0.05, 0.93, {10: 0.92})
    run = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0,1", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert saved["seeds"]["1"]["gain"] == 0.93 - 0.05
    assert (tmp_path / "heldout_curves.png").stat().st_size > 1000
    assert (tmp_path / "seeds.md").read_text() in run.stdout
    for bad in (["--seeds", "0,0"], ["--seeds", "a"], ["--seeds", "0", "--set", "seed=2"]):
        run = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path)] + bad,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "--seeds" in run.stderr, (bad, run.stderr)
