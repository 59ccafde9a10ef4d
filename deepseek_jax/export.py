"""Export any run to a Hugging Face directory that `transformers` loads and generates from.

    python -m deepseek_jax.convert --from_workdir runs/demo/grpo --to_hf out/grpo [--dtype bfloat16] [--step N]

`hf.save_pretrained` writes config.json and the safetensors; this adds what `generate`
needs to behave as ours does: the control-token ids in config.json and in
generation_config.json (without `eos_token_id` transformers runs past `<eos>`), and the
tokenizer: a copy of the run's tokenizer.json, or for the byte tokenizer an equivalent
byte-level tokenizer.json built with the `tokenizers` library (ids 0..255 the bytes,
256.. the special tokens, BOS prepended like `encode(add_bos=True)`).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax.numpy as jnp

from deepseek_jax import hf, loading
from deepseek_jax.data.tokenizer import BYTE_SPECIAL_TOKENS, CONTROL_TOKENS, ByteTokenizer, get_tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which tokenizers' ByteLevel pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def byte_tokenizer_json() -> str:
    """ByteTokenizer as a Hugging Face tokenizer.json (same ids, same special-token handling)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    byte_tok = ByteTokenizer()
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Added in id order: <pad> <bos> <eos> (special: skipped by decode(skip_special_tokens=True))
    # then the reasoning tags (kept, as ours keeps them).
    for t in BYTE_SPECIAL_TOKENS:
        added = AddedToken(t, special=t in CONTROL_TOKENS, normalized=False)
        (tok.add_special_tokens if t in CONTROL_TOKENS else tok.add_tokens)([added])
        assert tok.token_to_id(t) == byte_tok.token_to_id(t), t
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", byte_tok.bos_id)])
    return tok.to_str()


def write_tokenizer(tokenizer_name: str, out_dir: str, max_positions: int) -> dict:
    """tokenizer.json + tokenizer_config.json in `out_dir`; returns the control-token ids."""
    tok = get_tokenizer(tokenizer_name)
    if tokenizer_name == "byte":
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            f.write(byte_tokenizer_json())
        names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        config = {}
    else:
        src = os.path.join(tokenizer_name, "tokenizer.json") if os.path.isdir(tokenizer_name) else tokenizer_name
        shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
        config_src = os.path.join(os.path.dirname(os.path.abspath(src)), "tokenizer_config.json")
        config = json.load(open(config_src)) if os.path.isfile(config_src) else {}
        names = {k: tok._tok.id_to_token(i) for k, i in
                 (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)) if i is not None}
    config.update(names, tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_positions)
    config.pop("auto_map", None)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(names, f, indent=2)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def export_hf(path: str, out_dir: str, *, dtype: str = "float32", step: Optional[int] = None,
              tokenizer: Optional[str] = None) -> dict:
    """Writes the model read from `path` (anything `loading.load` reads) to `out_dir` as a
    Hugging Face checkpoint with tokenizer and generation config; returns the ids written."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"--to_hf {out_dir!r} is not empty; choose a new directory or delete it")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype={dtype!r}: use float32 or bfloat16")
    loaded = loading.load(path, step=step)
    return write_hf(loaded.model, loaded.params, tokenizer or loaded.tokenizer, out_dir, dtype=dtype)


def write_hf(model, params, tokenizer: str, out_dir: str, *, dtype: str = "float32") -> dict:
    """`model`/`params` as a Hugging Face directory: safetensors, config.json with the
    control-token ids, generation_config.json and the tokenizer files; returns the ids."""
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(model, params, out_dir, dtype=jnp.dtype(dtype))
    ids = write_tokenizer(tokenizer, out_dir, model.config.max_position_embeddings)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(ids, torch_dtype=dtype)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(dict(ids, do_sample=False, max_length=model.config.max_position_embeddings), f, indent=2)
    return ids
