"""The miniature R1 recipe over several seeds: one table, one figure.

    python experiments/r1_seeds.py --seeds 0,1,2 --workdir runs/seeds [--config CFG] [--set KEY=VALUE]

Each seed runs experiments/r1_pipeline.py in its own process with `--set seed=N`, which
changes the pretraining corpus, the initialisation, the cold-start SFT data, the GRPO prompts
and the held-out set, into WORKDIR/seed_N. Finished stages are skipped, so an interrupted
sweep resumes where it stopped. Writes WORKDIR/seeds.md (each seed's SFT -> GRPO -> student
held-out accuracy, mean +- sd, the machine), WORKDIR/seeds.json and WORKDIR/heldout_curves.png
(every seed's held-out accuracy along the GRPO run).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PIPELINE = REPO / "experiments" / "r1_pipeline.py"
COLUMNS = ("sft_accuracy", "grpo_accuracy", "gain", "student_accuracy",
           "sft_completion_length", "grpo_completion_length", "wall_seconds")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    cores = os.cpu_count()
    return f"{names[0] if names else platform.processor() or platform.machine()}, {cores} cores"


def heldout_curve(seed_dir: str, sft_accuracy: float) -> list[tuple[int, float]]:
    """(GRPO step, greedy held-out accuracy); step 0 is the cold-start SFT policy."""
    curve = [(0, sft_accuracy)]
    with open(os.path.join(seed_dir, "grpo", "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval/accuracy" in row:
                curve.append((row["step"], row["eval/accuracy"]))
    return curve


def run_seed(seed: int, workdir: str, config: str, overrides: list[str]) -> dict:
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    summary_path = os.path.join(seed_dir, "summary.json")
    if not os.path.exists(summary_path):
        cmd = [sys.executable, str(PIPELINE), "--workdir", seed_dir, "--config", config,
               "--set", f"seed={seed}"] + [a for o in overrides for a in ("--set", o)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(summary_path) as f:
        summary = json.load(f)
    summary["gain"] = summary["grpo_accuracy"] - summary["sft_accuracy"]
    summary["curve"] = heldout_curve(seed_dir, summary["sft_accuracy"])
    return summary


def table(results: dict[int, dict], machine: str) -> str:
    def points(x):
        return f"{100 * x:.1f}"

    lines = [f"Machine: {machine}. Greedy held-out accuracy (%) on "
             f"{next(iter(results.values()))['heldout_size']} problems per seed.", "",
             "| seed | cold-start SFT | + GRPO | gain (points) | dense student | length SFT -> GRPO "
             "| wall (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for seed, r in results.items():
        lines.append(f"| {seed} | {points(r['sft_accuracy'])} | {points(r['grpo_accuracy'])} | "
                     f"{100 * r['gain']:+.1f} | {points(r['student_accuracy'])} | "
                     f"{r['sft_completion_length']:.1f} -> {r['grpo_completion_length']:.1f} | "
                     f"{r['wall_seconds']:.0f} |")
    if len(results) > 1:
        def mean_sd(key):
            values = [100 * r[key] for r in results.values()]
            return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}"
        lines.append(f"| mean +- sd | {mean_sd('sft_accuracy')} | {mean_sd('grpo_accuracy')} | "
                     f"{mean_sd('gain')} | {mean_sd('student_accuracy')} | | |")
    return "\n".join(lines) + "\n"


def figure(results: dict[int, dict], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for seed, r in results.items():
        steps, accuracy = zip(*r["curve"])
        ax.plot(steps, accuracy, "o-", lw=1.2, ms=3, label=f"seed {seed}")
    ax.set_xlabel("GRPO step (0: cold-start SFT policy)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("GRPO on the tiny V3 policy, every seed")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--workdir", default="runs/seeds")
    parser.add_argument("--config", default=str(REPO / "configs" / "r1_tiny.py"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every stage and seed (not seed itself)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds needs distinct integers, got {args.seeds!r}")
    if any(o.split("=", 1)[0].strip() == "seed" for o in args.set):
        parser.error("--set seed=... conflicts with --seeds")
    results = {seed: run_seed(seed, args.workdir, args.config, args.set) for seed in seeds}
    machine = cpu_name()
    text = table(results, machine)
    print("\n" + text)
    with open(os.path.join(args.workdir, "seeds.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.workdir, "seeds.json"), "w") as f:
        json.dump({"machine": machine, "seeds": {str(s): {k: r[k] for k in COLUMNS + ("curve",)}
                                                 for s, r in results.items()}}, f, indent=2)
    figure(results, os.path.join(args.workdir, "heldout_curves.png"))
    print(f"table: {args.workdir}/seeds.md  figure: {args.workdir}/heldout_curves.png")


if __name__ == "__main__":
    main()
