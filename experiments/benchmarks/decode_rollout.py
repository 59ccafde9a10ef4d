"""`decode.py --rollout`: a GRPO-shaped rollout with each sampler path, and HF `generate` as the peer.

    python experiments/benchmarks/decode.py --rollout          # trains the policy once (~300 steps), then times
    python experiments/benchmarks/decode.py --rollout --json   # one JSON object on stdout
    python experiments/benchmarks/decode.py --rollout --policy runs/demo/sft   # an existing policy

The policy is the r1_tiny architecture (MLA + DeepSeekMoE + MTP; configs/r1_tiny.py), trained
briefly with the pretraining stage's loss (MTP included) unless `--policy` names a workdir.
The rollout is the demo's GRPO shape (configs/r1_tiny.py:grpo): `--prompts` arithmetic problems x
G = 8 samples each (default: the demo's 32 prompts per step), its max_prompt_len, max_new_tokens and
temperature 0.7, stop at EOS. Paths, all in one run: plain (one prefill per row, one token per
step, every row decoded until the last one stops), shared prefill (`num_samples=G`), compaction
(`Sampler(compact=True)`: finished rows leave the decode batch), MTP speculative
(`speculative="mtp"`), and combinations. tokens/s counts the tokens each run sampled (stop
tokens included) over its wall time: the fastest of `--repeats` runs, the paths interleaved. `acceptance` is
the share of MTP drafts the main model accepted in the sampled speculative rollout;
`greedy_identical`: greedy rollouts of every path equal the plain one token for token;
`sampled_identical`: so do the sampled rollouts of every path without MTP (randomness is per
row, so sharing the prefill or dropping finished rows changes no draw). The peer
is transformers' `generate` on the same weights (`hf.save_pretrained`), the same rows (prompts x
G via num_return_sequences), sampling at the same temperature, KV cache on.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import common  # noqa: F401  (puts the repository on sys.path)
from deepseek_jax import experiment

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO_GRPO = experiment.load_config(str(REPO / "configs/r1_tiny.py:grpo"))
# The demo's GRPO shape: G = 8, max_prompt_len 20, max_new_tokens 48, temperature 0.7.
G, MAX_PROMPT, MAX_NEW, TEMPERATURE = (DEMO_GRPO.grpo.group_size, DEMO_GRPO.grpo.max_prompt_len,
                                       DEMO_GRPO.grpo.max_new_tokens, DEMO_GRPO.grpo.temperature)
# name: (speculative, shared prefill, compact)
PATHS = {"plain": (None, False, False), "shared_prefill": (None, True, False), "compact": (None, False, True),
         "mtp": ("mtp", False, False), "shared+compact": (None, True, True), "mtp+shared+compact": ("mtp", True, True)}
MTP_PATH = "mtp+shared+compact"  # the acceptance reported


def train_policy(workdir: pathlib.Path, steps: int) -> None:
    """The r1_tiny policy after `steps` pretraining steps (skipped when already there)."""
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        return
    cmd = [sys.executable, "-m", "deepseek_jax.train", "--config", "configs/r1_tiny.py:pretrain",
           "--workdir", str(workdir), f"--config.total_steps={steps}", f"--config.checkpoint_every={steps}",
           "--config.progress=False"]
    print("training the benchmark policy:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=REPO, check=True)


def load_policy(args):
    from deepseek_jax import generate as generate_lib
    from deepseek_jax.config import ModelConfig
    from deepseek_jax.data.tokenizer import get_tokenizer
    from deepseek_jax.model import Transformer, init_params

    if args.quick:  # an untrained tiny MLA + MoE + MTP model: the smoke test's code paths
        model = experiment.load_config(str(REPO / "configs/r1_tiny.py:pretrain")).model.to_dict()
        fields = dict({k: v for k, v in model.items() if v is not None}, num_hidden_layers=2, hidden_size=32)
        config = ModelConfig(**fields)
        return Transformer(config), jax.jit(init_params, static_argnums=0)(config, jax.random.key(0)), \
            get_tokenizer("byte")
    workdir = pathlib.Path(args.policy) if args.policy else REPO / ".bench_cache" / f"r1_tiny_pretrain_{args.train_steps}"
    if not args.policy:
        train_policy(workdir, args.train_steps)
    model, params, tokenizer = generate_lib.load(workdir=str(workdir))
    return model, params, get_tokenizer(tokenizer)


def problems(count: int) -> list[dict]:
    from deepseek_jax.rl import grpo

    return grpo.training_problems(DEMO_GRPO, step=0)[:count]


def run_paths(model, params, prompts, tokenizer, repeats):
    """Per path: greedy tokens, then `repeats` timed sampled rollouts, the paths interleaved
    (round robin) so that a change in machine load hits them alike; the fastest run counts."""
    from deepseek_jax.rl.sampler import Sampler

    rows, stop = [p for p in prompts for _ in range(G)], [tokenizer.eos_id]
    runs, out = {}, {}
    for name, (speculative, shared, compact) in PATHS.items():
        sampler = Sampler(model, MAX_PROMPT, MAX_NEW, pad_id=tokenizer.pad_id, speculative=speculative,
                          compact=compact)

        def run(temperature, key, sampler=sampler, shared=shared):
            kwargs = dict(temperature=temperature, stop_tokens=stop)
            if shared:
                return sampler.generate(params, prompts, key, num_samples=G, **kwargs)
            return sampler.generate(params, rows, key, **kwargs)

        greedy = jax.device_get(run(0.0, jax.random.key(0)))
        sampled = jax.device_get(run(TEMPERATURE, jax.random.key(1)))  # compiled once: temperature is traced
        runs[name] = run
        out[name] = dict(times=[], tokens=[], drafts=0, accepted=0, greedy=np.asarray(greedy.tokens),
                         sampled=None if speculative else np.asarray(sampled.tokens),
                         greedy_acceptance=(int(greedy.accepted.sum()) / max(int(greedy.drafts.sum()), 1)
                                            if speculative else None))
    for r in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            sample = jax.block_until_ready(run(TEMPERATURE, jax.random.key(100 + r)))
            o = out[name]
            o["times"].append(time.perf_counter() - start)
            o["tokens"].append(int(sample.lengths.sum()))
            if sample.drafts is not None:
                o["drafts"] += int(sample.drafts.sum())
                o["accepted"] += int(sample.accepted.sum())
    for o in out.values():
        o["seconds"] = float(np.min(o["times"]))
        o["tokens"] = float(np.mean(o["tokens"]))
        o["tokens_per_s"] = o["tokens"] / o["seconds"]
        o["acceptance"] = o["accepted"] / o["drafts"] if o["drafts"] else None
    return out


def hf_generate(model, params, prompts, tokenizer, repeats, threads):
    """tokens/s of transformers' generate on the same weights and rows."""
    import torch
    import transformers

    from deepseek_jax import hf
    from deepseek_jax.rl.sampler import left_pad

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(model, params, tmp)
        peer = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids, lengths = left_pad(prompts, MAX_PROMPT, tokenizer.pad_id)
    input_ids = torch.from_numpy(ids).long()
    attention = torch.from_numpy((np.arange(MAX_PROMPT)[None] >= MAX_PROMPT - lengths[:, None]).astype(np.int64))
    kwargs = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW,
                  num_return_sequences=G, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                  use_cache=True)

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = peer.generate(input_ids=input_ids, attention_mask=attention, **kwargs)[:, MAX_PROMPT:].numpy()
        # Sampled tokens: up to and including the first EOS (HF pads after it).
        is_stop = out == tokenizer.eos_id
        counted = np.cumsum(is_stop, axis=1) - is_stop == 0
        return int(counted.sum())

    run(0)  # warm-up
    times, tokens = [], []
    for r in range(repeats):
        start = time.perf_counter()
        tokens.append(run(100 + r))
        times.append(time.perf_counter() - start)
    sec = float(np.min(times))
    return dict(seconds=sec, tokens=float(np.mean(tokens)), tokens_per_s=float(np.mean(tokens)) / sec)


def bench(args) -> tuple[dict, str]:
    """(the JSON summary, the markdown body for RESULTS.md)."""
    model, params, tokenizer = load_policy(args)
    count = args.prompts or DEMO_GRPO.grpo.prompts_per_step
    prompts = [tokenizer.encode(p["prompt"], add_bos=True) for p in problems(count)]
    paths = run_paths(model, params, prompts, tokenizer, args.repeats)
    peer = hf_generate(model, params, prompts, tokenizer, args.repeats, args.threads) if not args.no_hf else None
    best = max(paths, key=lambda k: paths[k]["tokens_per_s"])
    plain = paths["plain"]["tokens_per_s"]
    summary = {
        "plain_tokens_per_s": plain, "best_tokens_per_s": paths[best]["tokens_per_s"], "best_path": best,
        "speedup": paths[best]["tokens_per_s"] / plain, "acceptance": paths[MTP_PATH]["acceptance"],
        "greedy_acceptance": paths[MTP_PATH]["greedy_acceptance"],
        "greedy_identical": all(bool(np.array_equal(p["greedy"], paths["plain"]["greedy"])) for p in paths.values()),
        "sampled_identical": all(bool(np.array_equal(p["sampled"], paths["plain"]["sampled"]))
                                 for p in paths.values() if p["sampled"] is not None),
        "hf_tokens_per_s": peer["tokens_per_s"] if peer else None,
        "paths": {k: {m: v[m] for m in ("seconds", "tokens", "tokens_per_s", "acceptance")} for k, v in paths.items()},
    }
    header = ["path", "s / rollout", "tokens", "tokens/s", "x plain", "MTP acceptance"]
    rows = [[k, f"{v['seconds']:.3f}", f"{v['tokens']:.0f}", f"{v['tokens_per_s']:.0f}",
             f"{v['tokens_per_s'] / plain:.2f}", "-" if v["acceptance"] is None else f"{v['acceptance']:.3f}"]
            for k, v in paths.items()]
    if peer:
        rows.append(["HF generate (torch)", f"{peer['seconds']:.3f}", f"{peer['tokens']:.0f}",
                     f"{peer['tokens_per_s']:.0f}", f"{peer['tokens_per_s'] / plain:.2f}", "-"])
    policy = "untrained tiny (--quick)" if args.quick else (args.policy or f"r1_tiny pretrained {args.train_steps} steps")
    body = (f"{common.machine_line()}\n\nRollout of {len(prompts)} prompts x G={G} (max_prompt_len {MAX_PROMPT}, "
            f"max_new_tokens {MAX_NEW}, temperature {TEMPERATURE}, stop at EOS), policy: {policy}; fastest of "
            f"{args.repeats} interleaved runs; greedy rollouts identical across paths: {summary['greedy_identical']}, "
            f"sampled rollouts of the paths without MTP: {summary['sampled_identical']}; greedy MTP "
            f"acceptance {summary['greedy_acceptance']:.3f}.\nCommand: `python experiments/benchmarks/decode.py "
            f"{' '.join(sys.argv[1:])}`\n\n" + common.markdown_table(header, rows))
    return summary, body
