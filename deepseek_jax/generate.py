"""Sample completions: `python -m deepseek_jax.generate --workdir DIR --prompt TEXT` (or `--hf HF_DIR`).

    python -m deepseek_jax.generate --workdir runs/tiny_v3 --prompt "12*34=" --max_new_tokens 32
    python -m deepseek_jax.generate --hf path/to/DeepSeek-V2-Lite --prompt "Hello" --temperature 0.7
    python -m deepseek_jax.generate --config configs/tiny_v3.py --prompt "hi"   # random init (smoke)

Weights come from the newest readable checkpoint in DIR/checkpoints (the experiment config is
DIR/config.json, written by the trainer), from a Hugging Face directory, or (smoke use only)
a random initialisation of `--config`. Tokenizer: `--tokenizer`, else the HF directory's
tokenizer.json, else the experiment's `data.tokenizer`, else bytes. Prompts start with BOS;
generation stops at EOS. Decoding is rl/sampler.py (KV cache, absorbed MLA decode).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from deepseek_jax import experiment
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


def restore_workdir(workdir: str):
    """(ConfigDict, Transformer, params) from a trainer workdir's newest readable checkpoint."""
    from deepseek_jax import checkpoint, optim, sharding, train_step

    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: is {workdir!r} a deepseek_jax.train workdir?")
    with open(config_path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    model = Transformer(experiment.model_config(cfg))
    # Restore onto one device: generation here is a single-device tool.
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(experiment.optimizer_config(cfg))
    rules = sharding.logical_rules(cfg.get("sharding_rules"))
    abstract = train_step.abstract_train_state(model, optimizer, mesh, rules)
    restored = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).restore(abstract)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first or pass --hf / --config")
    return cfg, model, restored.state.params


def load(workdir: Optional[str] = None, hf_dir: Optional[str] = None, cfg=None):
    """(model, params, default tokenizer name) from exactly one of the three sources."""
    if sum(x is not None for x in (workdir, hf_dir, cfg)) != 1:
        raise ValueError("pass exactly one of --workdir DIR, --hf HF_DIR or --config CFG")
    if workdir is not None:
        cfg, model, params = restore_workdir(workdir)
        return model, params, cfg.get("data", {}).get("tokenizer", "byte") or "byte"
    if hf_dir is not None:
        from deepseek_jax import hf

        model, params = hf.from_pretrained(hf_dir, dtype=jnp.float32)
        has_tok = os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
        return model, params, hf_dir if has_tok else "byte"
    model_cfg = experiment.model_config(cfg)
    params = jax.jit(init_params, static_argnums=0)(model_cfg, jax.random.key(cfg.get("seed", 0)))
    return Transformer(model_cfg), params, cfg.data.get("tokenizer", "byte") if "data" in cfg else "byte"


def generate_text(model, params, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float,
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0, absorbed: bool = True):
    """[(completion text, summed log-prob)] per prompt."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
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
    model, params, default_tok = load(_WORKDIR.value, _HF.value, _CONFIG.value)
    tokenizer = get_tokenizer(_TOKENIZER.value or default_tok)
    results = generate_text(model, params, tokenizer, list(_PROMPT.value), max_new_tokens=_MAX_NEW.value,
                            temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                            seed=_SEED.value, absorbed=not _NAIVE.value)
    for prompt, (text, logprob) in zip(_PROMPT.value, results):
        print(f"{prompt}{text}" + (f"\t[logprob {logprob:.3f}]" if _SHOW_LOGPROBS.value else ""))


if __name__ == "__main__":
    app.run(main)
