"""Sample completions: `python -m deepseek_jax.generate --workdir DIR --prompt TEXT` (or `--hf HF_DIR`).

    python -m deepseek_jax.generate --workdir runs/tiny_v3 --prompt "12*34=" --max_new_tokens 32
    python -m deepseek_jax.generate --hf path/to/DeepSeek-V2-Lite --prompt "Hello" --temperature 0.7
    python -m deepseek_jax.generate --config configs/tiny_v3.py --prompt "hi"   # random init (smoke)

Weights come from the newest complete checkpoint in DIR/checkpoints (or `--step N`) of a
trainer or GRPO workdir (the experiment config is DIR/config.json), from a Hugging Face
directory (`--hf`, or `--workdir` pointed at one), or (smoke use only) a random
initialisation of `--config`. The workdir is only read (loading.py): generating beside a
running training is safe. A prompt + --max_new_tokens longer than the model's
max_position_embeddings is refused (`--truncate_prompt` keeps the prompt's end instead). Tokenizer: `--tokenizer`, else the HF directory's
tokenizer.json, else the experiment's `data.tokenizer`, else bytes. Prompts start with BOS;
generation stops at EOS. Decoding is rl/sampler.py (KV cache, absorbed MLA decode).
"""
from __future__ import annotations

from typing import Optional

import jax
from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import cli, experiment, loading
from deepseek_jax.data.tokenizer import get_tokenizer
from deepseek_jax.model import Transformer, init_params
from deepseek_jax.rl.sampler import Sampler

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config path.py[:arg] (random init).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trainer workdir: DIR/config.json + DIR/checkpoints.")
_HF = flags.DEFINE_string("hf", None, "Hugging Face directory (config.json + *.safetensors).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'byte' or a tokenizer.json (default: see docstring).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to sample per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NAIVE = flags.DEFINE_bool("naive_decode", False, "MLA: expand K/V from the latent instead of absorbing.")
_SHOW_LOGPROBS = flags.DEFINE_bool("logprobs", False, "Also print the summed log-probability.")
_STEP = flags.DEFINE_integer("step", None, "--workdir: this checkpoint step (default: the newest complete one).")
_TRUNCATE = flags.DEFINE_bool("truncate_prompt", False, "Keep only the end of a prompt that, with "
                              "--max_new_tokens, exceeds max_position_embeddings (default: refuse).")


def restore_workdir(workdir: str, step: Optional[int] = None):
    """(ConfigDict, Transformer, params) from a trainer or GRPO workdir's newest complete
    checkpoint (or `step`), read-only (loading.py)."""
    loaded = loading.load(workdir, step=step)
    return loaded.config, loaded.model, loaded.params


def load(workdir: Optional[str] = None, hf_dir: Optional[str] = None, cfg=None, step: Optional[int] = None):
    """(model, params, default tokenizer name) from exactly one of the three sources.

    `workdir` may also be any directory `loading.load` reads (HF, convert's Orbax).
    """
    if sum(x is not None for x in (workdir, hf_dir, cfg)) != 1:
        raise ValueError("pass exactly one of --workdir DIR, --hf HF_DIR or --config CFG")
    if workdir is not None or hf_dir is not None:
        loaded = loading.load(workdir if workdir is not None else hf_dir, step=step)
        return loaded.model, loaded.params, loaded.tokenizer
    model_cfg = experiment.model_config(cfg)
    params = jax.jit(init_params, static_argnums=0)(model_cfg, jax.random.key(cfg.get("seed", 0)))
    return Transformer(model_cfg), params, cfg.data.get("tokenizer", "byte") if "data" in cfg else "byte"


def fit_prompts(ids: list[list[int]], max_new_tokens: int, max_positions: int, truncate: bool) -> list[list[int]]:
    """Refuses (or, with `truncate`, left-truncates) prompts that leave no room for
    `max_new_tokens` within the model's `max_position_embeddings`: positions past it were
    never trained (and past the RoPE table's intended range), so the output is garbage."""
    room = max_positions - max_new_tokens
    longest = max(map(len, ids))
    if longest <= room:
        return ids
    if room < 1:
        raise ValueError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt within the model's "
                         f"max_position_embeddings={max_positions}; use --max_new_tokens < {max_positions}")
    if not truncate:
        raise ValueError(f"a prompt of {longest} tokens + --max_new_tokens={max_new_tokens} = "
                         f"{longest + max_new_tokens} exceeds the model's max_position_embeddings={max_positions}; "
                         f"shorten the prompt, lower --max_new_tokens, or pass --truncate_prompt to keep "
                         f"its last {room} tokens")
    # Keep BOS and the prompt's end (what the completion continues from).
    return [p if len(p) <= room else p[:1] + p[len(p) - room + 1:] for p in ids]


def generate_text(model, params, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float,
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0, absorbed: bool = True,
                  truncate_prompt: bool = False):
    """[(completion text, summed log-prob)] per prompt."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    ids = fit_prompts([tokenizer.encode(p, add_bos=True) for p in prompts], max_new_tokens,
                      model.config.max_position_embeddings, truncate_prompt)
    sampler = Sampler(model, max_prompt_len=max(map(len, ids)), max_new_tokens=max_new_tokens,
                      pad_id=tokenizer.pad_id, absorbed=absorbed, vocab_limit=tokenizer.vocab_size)
    out = sampler.generate(params, ids, jax.random.key(seed), temperature=temperature, top_p=top_p, top_k=top_k,
                           stop_tokens=[tokenizer.eos_id])
    results = []
    for b in range(len(prompts)):
        n = int(out.lengths[b])
        results.append((tokenizer.decode([int(t) for t in out.tokens[b, :n]], skip_special_tokens=True),
                        float(out.logprobs[b].sum())))
    return results


def main(argv):
    del argv
    if not _PROMPT.value:
        raise app.UsageError("--prompt TEXT is required (repeat it for several prompts)")
    model, params, default_tok = load(_WORKDIR.value, _HF.value, _CONFIG.value, step=_STEP.value)
    tokenizer = get_tokenizer(_TOKENIZER.value or default_tok)
    results = generate_text(model, params, tokenizer, list(_PROMPT.value), max_new_tokens=_MAX_NEW.value,
                            temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                            seed=_SEED.value, absorbed=not _NAIVE.value, truncate_prompt=_TRUNCATE.value)
    for prompt, (text, logprob) in zip(_PROMPT.value, results):
        print(f"{prompt}{text}" + (f"\t[logprob {logprob:.3f}]" if _SHOW_LOGPROBS.value else ""))


if __name__ == "__main__":
    cli.run(main, "deepseek_jax.generate", __doc__)
