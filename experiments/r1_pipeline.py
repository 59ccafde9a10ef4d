"""The miniature DeepSeek-R1 recipe, every stage in order (what `make demo` runs).

    python experiments/r1_pipeline.py --workdir runs/demo [--config configs/r1_tiny.py]

  1. pretrain   the tiny V3 policy on the embedded arithmetic corpus (plain text; half the
                records show a worked solution, half the answer alone)
  2. sft        cold start: a short SFT on `<think>..</think><answer>..</answer>` pairs,
                three quarters with an empty think block
  3. grpo       RL with rule-based rewards (accuracy + format), group advantages: the
                policy learns that thinking first pays (completions grow, accuracy rises)
  4. rejection  sample the GRPO policy on training prompts, keep correct, well-formatted
                completions (R1 §2.3.3)
  5. student    a small dense V1-style base model (pretrained like the policy), fine-tuned
                on those samples (R1 §2.4 distillation)
Held-out accuracy (problems never seen in training, synthetic.py's split) is measured
after SFT, GRPO and for the student with the same decoding; the table and
WORKDIR/summary.json report them, and WORKDIR/reward_curve.png plots the GRPO run.
A finished stage (its workdir has a final checkpoint) is not rerun.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from deepseek_jax import experiment, trainer, warm_start  # noqa: E402
from deepseek_jax.data import synthetic  # noqa: E402
from deepseek_jax.data.tokenizer import get_tokenizer  # noqa: E402
from deepseek_jax.rl import grpo as grpo_lib  # noqa: E402
from deepseek_jax.rl import rewards  # noqa: E402

log = logging.getLogger("r1_pipeline")


def finished(workdir: str, total_steps: int) -> bool:
    try:
        return os.path.basename(warm_start.latest_step_dir(workdir)) == str(total_steps)
    except FileNotFoundError:
        return False


def stage_config(spec: str, stage: str, overrides: list[str]):
    return experiment.load_config(f"{spec}:{stage}", overrides)


def train_stage(cfg, workdir: str, init_from: str = "") -> None:
    if finished(workdir, cfg.total_steps):
        log.info("%s: done already", workdir)
        return
    cfg.init_from = init_from
    trainer.run(cfg, workdir)  # the entry of `python -m deepseek_jax.train` (loss=grpo: the GRPO loop)


def evaluator(cfg, grpo_cfg):
    """A GRPO object for `cfg`'s model, used only to sample and score held-out problems."""
    cfg.grpo = grpo_cfg.grpo
    cfg.loss_config.policy_temperature = grpo_cfg.grpo.temperature
    mesh = trainer.build_mesh(cfg)
    parts = trainer.build_state_and_step(cfg, mesh, loss_name="sft")
    return grpo_lib.GRPO(cfg, parts, get_tokenizer(cfg.data.tokenizer)), mesh


def rejection_sample(grpo, params, cfg, path: str, num_problems: int, samples_per_problem: int) -> dict:
    """Correct, well-formatted completions of the policy on training prompts, as SFT JSONL."""
    problems = [synthetic.make_problem(i, split="train", seed=f"rejection/{cfg.seed}",
                                       **grpo_lib._task_options(cfg.grpo))
                for i in range(num_problems)]
    kept, seen = [], set()
    rng = jax.random.key(cfg.seed + 7)
    batch = 256
    rows = [p for p in problems for _ in range(samples_per_problem)]
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - real)
        sample = jax.device_get(grpo.generate(params, chunk, jax.random.fold_in(rng, start),
                                              temperature=1.0))
        for p, text in zip(chunk[:real], grpo_lib.completion_texts(grpo.tokenizer, sample)[:real]):
            ok = rewards.accuracy(p["prompt"], text, **p) and rewards.format_reward(p["prompt"], text, **p)
            if ok and (p["prompt"], text) not in seen:
                seen.add((p["prompt"], text))
                kept.append({"prompt": p["prompt"], "response": text})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    return {"rejection_samples": len(rows), "rejection_kept": len(kept)}


def reward_curve(grpo_dir: str, out_png: str, sft_accuracy: float) -> None:
    """Per-step reward, training accuracy and completion length, and held-out accuracy
    (step 0: the SFT policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(grpo_dir, "metrics.jsonl"))]
    train = [r for r in rows if "reward_mean" in r]
    evals = {0: sft_accuracy, **{r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward_mean"] for r in train], lw=1, alpha=0.7, label="reward (mean)")
    ax.plot(steps, [r["accuracy"] for r in train], lw=1, alpha=0.7, label="training accuracy (T=0.7)")
    ax.plot(list(evals), list(evals.values()), "o-", color="k", label="held-out accuracy (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1.15)
    ax.grid(alpha=0.3)
    length_ax = ax.twinx()
    length_ax.plot(steps, [r["completion_length"] for r in train], lw=1, color="tab:red",
                   label="completion length (tokens, right)")
    length_ax.set_ylim(0, 1.15 * max(r["completion_length"] for r in train))
    lines = ax.get_lines() + length_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper center",
              bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=2, frameon=False)
    ax.set_title("GRPO on the tiny V3 policy (three-operand +/- chains)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--config", default=str(REPO / "configs" / "r1_tiny.py"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every stage, e.g. --set seed=1")
    parser.add_argument("--rejection_problems", type=int, default=1000)
    parser.add_argument("--rejection_samples", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    start = time.time()
    wd = {s: os.path.join(args.workdir, s)
          for s in ("pretrain", "sft", "grpo", "student_pretrain", "student")}
    times = {}

    t = time.time()
    train_stage(stage_config(args.config, "pretrain", args.set), wd["pretrain"])
    train_stage(stage_config(args.config, "sft", args.set), wd["sft"], init_from=wd["pretrain"])
    times["pretrain_sft_s"] = time.time() - t

    t = time.time()
    grpo_cfg = stage_config(args.config, "grpo", args.set)
    grpo_result = None
    if not finished(wd["grpo"], grpo_cfg.total_steps):
        grpo_cfg.init_from = wd["sft"]
        grpo_result = trainer.run(grpo_cfg, wd["grpo"])
    times["grpo_s"] = time.time() - t

    t = time.time()
    policy, mesh = evaluator(stage_config(args.config, "grpo", args.set), grpo_cfg)
    heldout = grpo_lib.heldout_problems(grpo_cfg)
    eval_rng = jax.random.key(grpo_cfg.seed + 1)
    sft_eval = grpo_lib.evaluate(policy, warm_start.load_params(wd["sft"], mesh), heldout, eval_rng)
    grpo_params = warm_start.load_params(wd["grpo"], mesh)
    grpo_eval = grpo_lib.evaluate(policy, grpo_params, heldout, eval_rng)
    samples_path = os.path.join(args.workdir, "rejection", "samples.jsonl")
    rs = rejection_sample(policy, grpo_params, grpo_cfg, samples_path, args.rejection_problems,
                          args.rejection_samples)
    times["eval_rejection_s"] = time.time() - t

    t = time.time()
    train_stage(stage_config(args.config, "student_pretrain", args.set), wd["student_pretrain"])
    student_cfg = stage_config(args.config, "student", args.set + [f"data.path={samples_path}"])
    train_stage(student_cfg, wd["student"], init_from=wd["student_pretrain"])
    student, student_mesh = evaluator(stage_config(args.config, "student", args.set), grpo_cfg)
    student_eval = grpo_lib.evaluate(student, warm_start.load_params(wd["student"], student_mesh), heldout,
                                     eval_rng)
    times["student_s"] = time.time() - t

    reward_curve(wd["grpo"], os.path.join(args.workdir, "reward_curve.png"), sft_eval["accuracy"])
    summary = {
        "sft_accuracy": sft_eval["accuracy"], "grpo_accuracy": grpo_eval["accuracy"],
        "student_accuracy": student_eval["accuracy"],
        "sft_format_rate": sft_eval["format_rate"], "grpo_format_rate": grpo_eval["format_rate"],
        "student_format_rate": student_eval["format_rate"],
        "sft_completion_length": sft_eval["completion_length"],
        "grpo_completion_length": grpo_eval["completion_length"],
        "student_completion_length": student_eval["completion_length"],
        # Greedy speculative decoding with the policy's MTP module as a one-token draft.
        "sft_mtp_acceptance": sft_eval.get("mtp_acceptance"),
        "grpo_mtp_acceptance": grpo_eval.get("mtp_acceptance"),
        "heldout_size": len(heldout), "eval_temperature": grpo_cfg.grpo.eval_temperature,
        **rs, **{k: round(v, 1) for k, v in times.items()},
        "wall_seconds": round(time.time() - start, 1),
    }
    if grpo_result is not None:
        summary["grpo_final_train_reward"] = grpo_result.get("reward_mean")
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    rows = [("cold-start SFT (tiny V3)", sft_eval), ("+ GRPO", grpo_eval),
            ("dense student (SFT on GRPO samples)", student_eval)]
    print(f"\nHeld-out problems: {len(heldout)} (never in training), decoding: "
          f"{'greedy' if not grpo_cfg.grpo.eval_temperature else grpo_cfg.grpo.eval_temperature}")
    print(f"{'model':40s} {'accuracy':>9s} {'format':>7s} {'length':>7s} {'MTP draft accepted':>19s}")
    for name, e in rows:
        mtp = f"{e['mtp_acceptance']:19.3f}" if "mtp_acceptance" in e else f"{'-':>19s}"
        print(f"{name:40s} {e['accuracy']:9.3f} {e['format_rate']:7.3f} {e['completion_length']:7.1f} {mtp}")
    print(f"\nsummary: {os.path.join(args.workdir, 'summary.json')}  "
          f"(wall {summary['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
