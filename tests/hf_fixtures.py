"""Tiny random Hugging Face checkpoints written in the layout DeepSeek publishes.

The oracle for parity is `transformers` itself: a torch model is built from a config dict,
given random weights, and written the way the released checkpoints are laid out
(per-expert keys, legacy `rope_scaling`, several shards + index, optional FP8 128x128 blocks,
an MTP layer at index num_hidden_layers). Tests load the same files with deepseek_jax.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

torch = None


def _torch():
    global torch
    if torch is None:
        import torch as _t
        torch = _t
    return torch


def yarn(mscale: float, factor: float = 4.0, original: int = 32) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}


def tiny_v3_config(**kw) -> dict:
    d = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=300, hidden_size=160,
             intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
             kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=24, qk_nope_head_dim=16,
             topk_method="noaux_tc", n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
             norm_topk_prob=True, scoring_func="sigmoid", max_position_embeddings=256, rms_norm_eps=1e-6,
             rope_theta=10000.0, rope_scaling=yarn(1.0), num_nextn_predict_layers=1, tie_word_embeddings=False,
             hidden_act="silu", attention_bias=False)
    d.update(kw)
    return d


def tiny_v2_config(**kw) -> dict:
    d = dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=300, hidden_size=64,
             intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=16.0,
             kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=24, qk_nope_head_dim=16,
             topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
             first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax", max_position_embeddings=256,
             rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=yarn(0.707), tie_word_embeddings=False,
             hidden_act="silu", attention_bias=False)
    d.update(kw)
    return d


def tiny_llama_config(**kw) -> dict:
    d = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
             hidden_act="silu", attention_bias=False, mlp_bias=False)
    d.update(kw)
    return d


def build_hf_model(config: dict, seed: int = 0):
    """A transformers model with random (not default-init) weights, in float32, eval mode."""
    t = _torch()
    import transformers
    cls = getattr(transformers, config["architectures"][0])
    cfg_cls = transformers.AutoConfig.for_model(config["model_type"]).__class__
    hf_cfg = cfg_cls(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    hf_cfg._attn_implementation = "eager"
    t.manual_seed(seed)
    model = cls(hf_cfg).to(t.float32).eval()
    g = t.Generator().manual_seed(seed + 1)
    with t.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * t.randn(p.shape, generator=g))
            else:
                p.copy_(t.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * t.randn(b.shape, generator=g))
    return model


def published_state_dict(model, config: dict) -> dict[str, np.ndarray]:
    """The model's weights under the published per-expert keys, as float32 numpy."""
    out = {}
    for name, v in model.state_dict().items():
        if "rotary_emb" in name:
            continue
        v = v.detach().float().numpy()
        if name.endswith("experts.gate_up_proj"):
            F = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :F]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, F:]
        elif name.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            out[name] = v
    return out


def add_mtp_layer(sd: dict, config: dict, seed: int = 7) -> dict:
    """Random weights for the MTP layer at index num_hidden_layers (V3 layout).

    Its block reuses the shapes of the last (MoE) decoder layer; embed_tokens and
    shared_head.head are copies of the shared ones, as in the released checkpoint.
    """
    rng = np.random.default_rng(seed)
    L = config["num_hidden_layers"]
    src, dst = f"model.layers.{L - 1}.", f"model.layers.{L}."
    D = config["hidden_size"]
    for k, v in list(sd.items()):
        if k.startswith(src):
            scale = 0.1 if k.endswith("norm.weight") or "layernorm" in k else 1 / math.sqrt(v.shape[-1])
            base = 1.0 if (k.endswith("norm.weight") or "layernorm" in k) else 0.0
            sd[dst + k[len(src):]] = (base + scale * rng.standard_normal(v.shape)).astype(np.float32)
    sd[dst + "enorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    sd[dst + "hnorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    sd[dst + "eh_proj.weight"] = (rng.standard_normal((D, 2 * D)) / math.sqrt(2 * D)).astype(np.float32)
    sd[dst + "shared_head.norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    sd[dst + "embed_tokens.weight"] = sd["model.embed_tokens.weight"]
    sd[dst + "shared_head.head.weight"] = sd["lm_head.weight"]
    return sd


FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}  # the largest finite value of each format


def quantize_fp8(w: np.ndarray, block: int = 128, fmt: str = "e4m3"):
    """Block-wise FP8 quantisation as DeepSeek-V3 publishes it: w ~= q * scale_inv per block."""
    import ml_dtypes
    dtype = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt]
    O, I = w.shape
    bo, bi = -(-O // block), -(-I // block)
    scale = np.zeros((bo, bi), np.float32)
    q = np.zeros((O, I), dtype)
    for a in range(bo):
        for b in range(bi):
            blk = w[a * block:(a + 1) * block, b * block:(b + 1) * block]
            s = max(float(np.abs(blk).max()) / FP8_MAX[fmt], 1e-12)
            scale[a, b] = s
            q[a * block:(a + 1) * block, b * block:(b + 1) * block] = (blk / s).astype(dtype)
    return q, scale


def is_fp8_quantised(key: str) -> bool:
    """V3 keeps norms, the router, embeddings and the head in higher precision."""
    return (key.endswith("proj.weight") and "layernorm" not in key and ".gate.weight" not in key
            and "eh_proj" not in key)


def write_checkpoint(path: str, config: dict, sd: dict[str, np.ndarray], *, shards: int = 3,
                     fp8: bool | str = False) -> dict[str, np.ndarray]:
    """Write config.json + `shards` safetensors files + index. Returns the effective float32
    weights (dequantised where FP8 was written), i.e. what a correct loader must produce.
    fp8: False, True / "e4m3" (what V3 publishes) or "e5m2"."""
    t = _torch()
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors, effective = {}, {}
    for k, v in sd.items():
        if fp8 and v.ndim == 2 and is_fp8_quantised(k):
            fmt = "e4m3" if fp8 is True else fp8
            q, s = quantize_fp8(v, fmt=fmt)
            torch_dtype = {"e4m3": t.float8_e4m3fn, "e5m2": t.float8_e5m2}[fmt]
            tensors[k] = t.from_numpy(q.view(np.uint8).copy()).view(torch_dtype)
            tensors[k[:-len("weight")] + "weight_scale_inv"] = t.from_numpy(s)
            effective[k] = q.astype(np.float32) * np.repeat(np.repeat(s, 128, 0), 128, 1)[:v.shape[0], :v.shape[1]]
        else:
            tensors[k] = t.from_numpy(np.ascontiguousarray(v))
            effective[k] = v
    keys = sorted(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return effective


def load_into_hf(model, effective: dict[str, np.ndarray]) -> None:
    """Set the torch model's weights to `effective` (per-expert keys re-fused)."""
    t = _torch()
    sd = model.state_dict()
    with t.no_grad():
        for name, v in sd.items():
            if name.endswith("experts.gate_up_proj"):
                for e in range(v.shape[0]):
                    F = v.shape[1] // 2
                    v[e, :F] = t.from_numpy(effective[name.replace("gate_up_proj", f"{e}.gate_proj.weight")])
                    v[e, F:] = t.from_numpy(effective[name.replace("gate_up_proj", f"{e}.up_proj.weight")])
            elif name.endswith("experts.down_proj"):
                for e in range(v.shape[0]):
                    v[e] = t.from_numpy(effective[name.replace("down_proj", f"{e}.down_proj.weight")])
            elif name in effective:
                v.copy_(t.from_numpy(effective[name]))
