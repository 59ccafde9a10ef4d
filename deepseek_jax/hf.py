"""Hugging Face interop: DeepSeek-V2/V3 and Llama-layout (DeepSeek V1) checkpoints.

    model, params = hf.from_pretrained("path/to/DeepSeek-V3", dtype=jnp.bfloat16)
    hf.save_pretrained(model, params, "out_dir")          # loads in `transformers`

Reads directories exactly as published: `config.json` (legacy `rope_scaling` dict or
`rope_parameters`), weights in one or several `*.safetensors` files (with or without
`model.safetensors.index.json`), routed experts as per-expert keys, the V3 router bias
`e_score_correction_bias`, FP8 (e4m3 or e5m2) weights with `weight_scale_inv` per 128x128
block (dequantised on load), and the MTP layer V3 stores at index `num_hidden_layers`
(skipped with `num_mtp_layers=0`; see `from_pretrained` for checkpoints that lack it).

Only safetensors are read, never pickle. Tensors are memory-mapped and each parameter is
assembled and placed into its sharding one at a time (`jax.make_array_from_callback`
copies only the slice each device needs), so host memory holds at most one parameter.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepseek_jax import layer_stack
from deepseek_jax.config import ModelConfig, RopeScaling
from deepseek_jax.model import Transformer

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FP8_BLOCK = 128
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the tensor and what is wrong."""


# ----- config.json <-> ModelConfig ---------------------------------------------------------

def _rope_scaling_from_hf(d: dict) -> Optional[RopeScaling]:
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("type") or rs.get("rope_type")
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise CheckpointError(f"config.json rope scaling type {kind!r} is not supported; only 'yarn' is")
    return RopeScaling(
        factor=float(rs.get("factor") or d["max_position_embeddings"] / rs["original_max_position_embeddings"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
        # Missing mscales read as 0, as in transformers: they select the plain YaRN temperature.
        mscale=float(rs.get("mscale") or 0.0), mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0))


def config_from_hf(d: dict, **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (deepseek_v2, deepseek_v3, llama)."""
    model_type = d.get("model_type", "")
    theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    common = dict(
        name=d.get("_name_or_path") or model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"], intermediate_size=d["intermediate_size"],
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings", 4096), num_attention_heads=d["num_attention_heads"],
        rope_theta=float(theta), rope_scaling=_rope_scaling_from_hf(d))
    if model_type in ("llama", "mistral") or d.get("architectures", [""])[0].startswith("Llama"):
        cfg = dict(common, attention="mha", num_key_value_heads=d.get("num_key_value_heads"),
                   head_dim=d.get("head_dim"), rope_interleave=False)
    elif model_type in ("deepseek_v2", "deepseek_v3"):
        v3 = model_type == "deepseek_v3"
        topk_method = d.get("topk_method", "noaux_tc" if v3 else "greedy")
        grouped = topk_method in ("group_limited_greedy", "noaux_tc") and (d.get("n_group") or 1) > 1
        cfg = dict(
            common, attention="mla", q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"], rope_interleave=bool(d.get("rope_interleave", True)),
            n_routed_experts=d.get("n_routed_experts") or 0, n_shared_experts=d.get("n_shared_experts") or 0,
            num_experts_per_tok=d.get("num_experts_per_tok") or 1,
            moe_intermediate_size=d.get("moe_intermediate_size") or 1,
            first_k_dense_replace=d.get("first_k_dense_replace", 0), moe_layer_freq=d.get("moe_layer_freq", 1),
            scoring_func=d.get("scoring_func", "sigmoid" if v3 else "softmax"),
            n_group=d["n_group"] if grouped else 1, topk_group=d["topk_group"] if grouped else 1,
            group_score="top2_sum" if topk_method == "noaux_tc" else "max",
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            router_bias=topk_method == "noaux_tc",
            num_mtp_layers=d.get("num_nextn_predict_layers", 0) if v3 else 0)
        if not v3 and cfg["norm_topk_prob"] and cfg["num_experts_per_tok"] > 1:
            # DeepSeek's released V2 code renormalises the top-k weights when norm_topk_prob
            # and then does NOT apply routed_scaling_factor (moe.routing_args); we follow it.
            # transformers' DeepseekV2 ignores the flag and always scales: its logits differ.
            logging.getLogger(__name__).warning(
                "config.json: deepseek_v2 with norm_topk_prob=true: routing follows DeepSeek's released "
                "V2 code (renormalise the top-%d weights, no routed_scaling_factor=%s); transformers' "
                "DeepseekV2 ignores norm_topk_prob, so its outputs will differ from this model's",
                cfg["num_experts_per_tok"], cfg["routed_scaling_factor"])
    else:
        raise CheckpointError(f"config.json model_type={model_type!r} is not supported; expected "
                              "'deepseek_v2', 'deepseek_v3' or 'llama'")
    return ModelConfig(**(cfg | overrides))


def config_to_hf(c: ModelConfig) -> dict:
    """A config.json in the published style (legacy `rope_scaling` dict with "type": "yarn")."""
    d = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
             rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
             max_position_embeddings=c.max_position_embeddings, hidden_act="silu", attention_bias=False,
             torch_dtype="float32")
    if c.rope_scaling is not None:
        d["rope_scaling"] = dict(dataclasses.asdict(c.rope_scaling), type="yarn")
    if c.attention == "mha":
        return d | dict(architectures=["LlamaForCausalLM"], model_type="llama",
                        num_key_value_heads=c.kv_heads, head_dim=c.mha_head_dim)
    v3 = c.scoring_func == "sigmoid" or c.router_bias or c.num_mtp_layers > 0
    dense_after = [i for i in range(c.first_k_dense_replace, c.num_hidden_layers) if c.is_moe and not c.is_moe_layer(i)]
    if dense_after:
        # transformers' DeepseekV2/V3 ignore moe_layer_freq: every layer from first_k_dense_replace
        # on is an MoE layer there, so these dense layers would not load (no identical rewrite exists).
        raise CheckpointError(f"moe_layer_freq={c.moe_layer_freq}: layers {dense_after} are dense here, but "
                              "transformers' DeepseekV2/V3 make every layer from first_k_dense_replace="
                              f"{c.first_k_dense_replace} on an MoE layer (they ignore moe_layer_freq); a Hugging "
                              "Face export needs moe_layer_freq=1")
    d |= dict(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
              qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, num_key_value_heads=c.num_attention_heads,
              n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
              num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
              first_k_dense_replace=c.first_k_dense_replace if c.is_moe else c.num_hidden_layers,
              moe_layer_freq=c.moe_layer_freq, scoring_func=c.scoring_func, n_group=c.n_group,
              topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
              routed_scaling_factor=c.routed_scaling_factor)
    if v3:
        if not (c.router_bias and c.group_score == "top2_sum" and c.scoring_func == "sigmoid"):
            raise CheckpointError("transformers' DeepseekV3 routes with sigmoid + bias + top2_sum groups; "
                                  f"this config has scoring_func={c.scoring_func!r}, router_bias={c.router_bias}, "
                                  f"group_score={c.group_score!r}")
        return d | dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", topk_method="noaux_tc",
                        num_nextn_predict_layers=c.num_mtp_layers, rope_interleave=c.rope_interleave)
    if c.group_score != "max" or not c.rope_interleave:
        raise CheckpointError("transformers' DeepseekV2 uses max group scores and interleaved RoPE; got "
                              f"group_score={c.group_score!r}, rope_interleave={c.rope_interleave}")
    return d | dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                    topk_method="group_limited_greedy" if c.n_group > 1 else "greedy")


# ----- the key map ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: our path, its Hugging Face key(s), and the layout change between them.

    kind "copy": same array. "linear": torch Linear weight [prod(out), prod(in)] <-> our kernel
    [*in, *out]. "experts": a stack over E per-expert linear keys (`hf` holds a {} for e).
    """

    path: tuple
    hf: str
    kind: str = "copy"
    in_shape: tuple = ()
    out_shape: tuple = ()
    num: int = 0


def _linear(path, hf, in_shape, out_shape):
    return Entry(path, hf, "linear", tuple(in_shape), tuple(out_shape))


def _block_entries(c: ModelConfig, ours: tuple, hf: str, moe: bool) -> list[Entry]:
    D, H = c.hidden_size, c.num_attention_heads
    a, m = ours + ("attn",), ours + ("mlp",)
    e = [Entry(ours + ("attn_norm", "scale"), f"{hf}.input_layernorm.weight"),
         Entry(ours + ("mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight")]
    if c.attention == "mha":
        G, K = c.kv_heads, c.mha_head_dim
        e += [_linear(a + ("q_proj", "kernel"), f"{hf}.self_attn.q_proj.weight", (D,), (H, K)),
              _linear(a + ("k_proj", "kernel"), f"{hf}.self_attn.k_proj.weight", (D,), (G, K)),
              _linear(a + ("v_proj", "kernel"), f"{hf}.self_attn.v_proj.weight", (D,), (G, K)),
              _linear(a + ("o_proj", "kernel"), f"{hf}.self_attn.o_proj.weight", (H, K), (D,))]
    else:
        C, R, QK = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_head_dim
        if c.q_lora_rank is None:
            e.append(_linear(a + ("q_proj", "kernel"), f"{hf}.self_attn.q_proj.weight", (D,), (H, QK)))
        else:
            Q = c.q_lora_rank
            e += [_linear(a + ("q_a_proj", "kernel"), f"{hf}.self_attn.q_a_proj.weight", (D,), (Q,)),
                  Entry(a + ("q_a_norm", "scale"), f"{hf}.self_attn.q_a_layernorm.weight"),
                  _linear(a + ("q_b_proj", "kernel"), f"{hf}.self_attn.q_b_proj.weight", (Q,), (H, QK))]
        e += [_linear(a + ("kv_a_proj", "kernel"), f"{hf}.self_attn.kv_a_proj_with_mqa.weight", (D,), (C + R,)),
              Entry(a + ("kv_a_norm", "scale"), f"{hf}.self_attn.kv_a_layernorm.weight"),
              _linear(a + ("kv_b_proj",), f"{hf}.self_attn.kv_b_proj.weight", (C,),
                      (H, c.qk_nope_head_dim + c.v_head_dim)),
              _linear(a + ("o_proj",), f"{hf}.self_attn.o_proj.weight", (H, c.v_head_dim), (D,))]
    if not moe:
        F = c.intermediate_size
        return e + _mlp_entries(m, f"{hf}.mlp", D, F)
    E, F = c.n_routed_experts, c.moe_intermediate_size
    e += [_linear(m + ("router",), f"{hf}.mlp.gate.weight", (D,), (E,))]
    if c.router_bias:
        e.append(Entry(m + ("e_score_correction_bias",), f"{hf}.mlp.gate.e_score_correction_bias"))
    e += [Entry(m + ("gate_proj",), f"{hf}.mlp.experts.{{}}.gate_proj.weight", "experts", (D,), (F,), E),
          Entry(m + ("up_proj",), f"{hf}.mlp.experts.{{}}.up_proj.weight", "experts", (D,), (F,), E),
          Entry(m + ("down_proj",), f"{hf}.mlp.experts.{{}}.down_proj.weight", "experts", (F,), (D,), E)]
    if c.n_shared_experts:
        e += _mlp_entries(m + ("shared_experts",), f"{hf}.mlp.shared_experts", D, F * c.n_shared_experts)
    return e


def _mlp_entries(ours, hf, D, F):
    return [_linear(ours + ("gate_proj", "kernel"), f"{hf}.gate_proj.weight", (D,), (F,)),
            _linear(ours + ("up_proj", "kernel"), f"{hf}.up_proj.weight", (D,), (F,)),
            _linear(ours + ("down_proj", "kernel"), f"{hf}.down_proj.weight", (F,), (D,))]


def key_map(c: ModelConfig) -> list[Entry]:
    """Every parameter of `Transformer(c)` with its Hugging Face key(s)."""
    D = c.hidden_size
    e = [Entry(("embed", "embedding"), "model.embed_tokens.weight"),
         Entry(("final_norm", "scale"), "model.norm.weight")]
    if not c.tie_word_embeddings:
        e.append(_linear(("lm_head", "kernel"), "lm_head.weight", (D,), (c.vocab_size,)))
    for i in range(c.num_hidden_layers):
        e += _block_entries(c, (f"layers_{i}",), f"model.layers.{i}", c.is_moe_layer(i))
    for k in range(c.num_mtp_layers):
        hf = f"model.layers.{c.num_hidden_layers + k}"
        e += [Entry((f"mtp_{k}", "enorm", "scale"), f"{hf}.enorm.weight"),
              Entry((f"mtp_{k}", "hnorm", "scale"), f"{hf}.hnorm.weight"),
              _linear((f"mtp_{k}", "eh_proj", "kernel"), f"{hf}.eh_proj.weight", (2 * D,), (D,)),
              Entry((f"mtp_{k}", "final_norm", "scale"), f"{hf}.shared_head.norm.weight")]
        e += _block_entries(c, (f"mtp_{k}", "block"), hf, c.is_moe)
    return e


def mtp_shared_keys(c: ModelConfig) -> list[str]:
    """Copies of the shared embedding and head that V3 checkpoints store inside each MTP layer."""
    out = []
    for k in range(c.num_mtp_layers):
        hf = f"model.layers.{c.num_hidden_layers + k}"
        out += [f"{hf}.embed_tokens.weight", f"{hf}.shared_head.head.weight"]
    return out


# ----- reading safetensors --------------------------------------------------------------------

class SafetensorsDir:
    """Memory-mapped tensors of every `*.safetensors` file in a directory, by key.

    The `safetensors` package cannot hand out FP8 (or, with numpy, bfloat16) arrays, so the
    documented format (8-byte little-endian header size, JSON header, raw data) is mapped
    with numpy + ml_dtypes directly; nothing is unpickled and nothing is copied until used.
    """

    def __init__(self, path: str):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {path!r} (pickled .bin checkpoints are not read; "
                                  "convert them with transformers' save_pretrained(safe_serialization=True))")
        index = os.path.join(path, "model.safetensors.index.json")
        expected = None
        if os.path.exists(index):
            with open(index) as f:
                expected = json.load(f)["weight_map"]
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            fpath = os.path.join(path, name)
            size = os.path.getsize(fpath)
            with open(fpath, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{fpath}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", raw)
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                end = 8 + n + info["data_offsets"][1]
                if end > size:
                    raise CheckpointError(f"{fpath}: tensor {key!r} ends at byte {end} but the file has {size} "
                                          "bytes (truncated download?)")
                self._where[key] = (fpath, info, 8 + n)
        if expected is not None:
            missing = sorted(k for k in expected if k not in self._where)
            if missing:
                raise CheckpointError(f"{index} lists {len(missing)} tensors not found in any shard, e.g. "
                                      f"{missing[:3]} (missing shard file?)")

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint")
        fpath, info, base = self._where[key]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != dtype.itemsize * math.prod(shape):
            raise CheckpointError(f"tensor {key!r} in {fpath}: header size does not match shape {shape}")
        return np.memmap(fpath, dtype=dtype, mode="r", offset=base + start, shape=shape)


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK, key: str = "weight") -> np.ndarray:
    """w [O, I] (e4m3 or e5m2) * scale_inv [ceil(O/128), ceil(I/128)], one scale per 128x128
    block (V3 §3.3). Any other grid shape is an error: slicing or broadcasting it would
    silently scale blocks by their neighbours' factors."""
    O, I = w.shape
    want = (-(-O // block), -(-I // block))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"FP8 tensor {key!r} has shape {(O, I)}, so its weight_scale_inv must be {want} (one "
                              f"scale per {block}x{block} block), but it is {tuple(scale_inv.shape)}; the checkpoint "
                              "is corrupt or uses another block size")
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block, axis=0), block, axis=1)[:O, :I]
    return np.asarray(w, np.float32) * s


def _read(st: SafetensorsDir, key: str) -> np.ndarray:
    w = st.get(key)
    if w.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
        scale_key = key[: -len("weight")] + "weight_scale_inv"
        if scale_key not in st:
            raise CheckpointError(f"FP8 tensor {key!r} has no {scale_key!r} block scales")
        return dequantize_fp8(w, st.get(scale_key), key=key)
    return np.asarray(w, np.float32)


def _to_ours(entry: Entry, w: np.ndarray) -> np.ndarray:
    if entry.kind == "copy":
        return w
    return w.T.reshape(entry.in_shape + entry.out_shape)


def _expected_hf_shape(entry: Entry, ours_shape: tuple) -> tuple:
    if entry.kind == "copy":
        return ours_shape
    return (math.prod(entry.out_shape), math.prod(entry.in_shape))


def _load_entry(st: SafetensorsDir, entry: Entry, ours_shape: tuple) -> np.ndarray:
    want = _expected_hf_shape(entry, ours_shape[1:] if entry.kind == "experts" else ours_shape)
    keys = [entry.hf.format(i) for i in range(entry.num)] if entry.kind == "experts" else [entry.hf]
    parts = []
    for key in keys:
        w = _read(st, key)
        if tuple(w.shape) != want:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(w.shape)}, the config implies {want} "
                                  f"(for parameter {'/'.join(entry.path)})")
        parts.append(_to_ours(entry, w) if entry.kind != "experts" else w.T)
    return parts[0] if entry.kind != "experts" else np.stack(parts)


def _tree_get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _tree_set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def abstract_params(config: ModelConfig):
    """ShapeDtypeStructs of the parameters, via eval_shape (nothing allocated)."""
    import flax.linen as nn
    model = Transformer(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    return nn.meta.unbox(shapes)


def _is_f32_leaf(path: tuple) -> bool:
    return path[-1] in ("router", "e_score_correction_bias")


def mtp_layers_stored(keys, num_hidden_layers: int) -> int:
    """How many MTP layers the checkpoint stores: model.layers.{L}, {L+1}, ... (L =
    num_hidden_layers) that have an eh_proj (any other layer past L stays an unknown tensor)."""
    keys = set(keys)
    n = 0
    while f"model.layers.{num_hidden_layers + n}.eh_proj.weight" in keys:
        n += 1
    return n


def load_config(path: str, st: Optional["SafetensorsDir"] = None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory, with `num_mtp_layers` what it really stores.

    transformers' DeepseekV3Config defaults num_nextn_predict_layers to 1, but its
    save_pretrained writes no MTP tensors (transformers has no MTP module): unless the caller
    sets num_mtp_layers, a checkpoint declaring more MTP layers than it stores is read with
    the stored ones only, and a warning says so.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    config = config_from_hf(hf_config, **overrides)
    if "num_mtp_layers" in overrides or not config.num_mtp_layers:
        return config
    stored = mtp_layers_stored((st or SafetensorsDir(path)).keys(), config.num_hidden_layers)
    if stored < config.num_mtp_layers:
        log.warning("%s: config.json declares num_nextn_predict_layers=%d but the checkpoint stores %d MTP "
                    "layer(s) (transformers' save_pretrained writes none); loading without the missing MTP "
                    "module(s). Pass num_mtp_layers=%d to initialise them fresh instead.",
                    path, config.num_mtp_layers, stored, config.num_mtp_layers)
        config = dataclasses.replace(config, num_mtp_layers=stored)
    return config


def _fresh_mtp(config: ModelConfig, ks: range, dtype, shardings, seed: int) -> dict:
    """Freshly initialised MTP modules mtp_k (k in ks), as `init_params` makes them; only
    their subtrees leave the jit, so XLA initialises nothing else."""
    import flax.linen as nn
    model = Transformer(config)

    def init(key):
        p = nn.meta.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x if _is_f32_leaf(tuple(q.key for q in path)) else x.astype(dtype),
            {f"mtp_{k}": p[f"mtp_{k}"] for k in ks})

    out = {f"mtp_{k}": shardings[f"mtp_{k}"] for k in ks} if shardings is not None else None
    return jax.jit(init, out_shardings=out)(jax.random.key(seed))


def from_pretrained(path: str, dtype=jnp.float32, shardings=None, mtp_init_seed: int = 0, **config_overrides):
    """Load a Hugging Face directory -> (Transformer, params).

    `shardings`: optional pytree of jax.sharding.Sharding matching the parameters (e.g. from
    `deepseek_jax.sharding`); each parameter is placed straight into it. The router and its
    bias stay float32 whatever `dtype` is (they are selection-critical, pitfall 2).

    MTP layers (V3 stores them at model.layers.{num_hidden_layers + k}): `num_mtp_layers=0`
    (or fewer than stored) skips the extra layers' tensors, as transformers does (logged
    once); without that override, the layers config.json declares but the files lack are left
    out (`load_config`); an explicit num_mtp_layers above what is stored initialises the
    missing modules fresh (seed `mtp_init_seed`), with a warning.
    """
    st = SafetensorsDir(path)
    config = load_config(path, st, **config_overrides)
    if layer_stack.stacks(config) is not None:
        # Scanned layers: read the published per-layer layout, then stack it (layer_stack.py).
        # The stacks are assembled on one device before `shardings` places them.
        # num_mtp_layers as resolved above, so load_config does not warn a second time.
        overrides = config_overrides | {"scan_layers": False, "num_mtp_layers": config.num_mtp_layers}
        _, params = from_pretrained(path, dtype, None, mtp_init_seed, **overrides)
        params = layer_stack.stack_layers(params, config)
        return Transformer(config), params if shardings is None else jax.device_put(params, shardings)
    stored_mtp = mtp_layers_stored(st.keys(), config.num_hidden_layers)
    fresh = range(min(stored_mtp, config.num_mtp_layers), config.num_mtp_layers)
    entries = [e for e in key_map(config) if not (e.path[0].startswith("mtp_") and int(e.path[0][4:]) in fresh)]
    shapes = abstract_params(config)
    params: dict = {}
    used = set(mtp_shared_keys(config)) | {k for k in st.keys() if k.endswith("weight_scale_inv")}
    used |= {k for k in st.keys() if "rotary_emb" in k}
    if stored_mtp > config.num_mtp_layers:
        L = config.num_hidden_layers
        skipped = [f"model.layers.{i}." for i in range(L + config.num_mtp_layers, L + stored_mtp)]
        skip = {k for k in st.keys() if k.startswith(tuple(skipped))}
        used |= skip
        log.warning("%s: skipping %d tensors of %d stored MTP layer(s) (%s...) that num_mtp_layers=%d leaves out",
                    path, len(skip), stored_mtp - config.num_mtp_layers, skipped[0], config.num_mtp_layers)
    if fresh:
        log.warning("%s: MTP module(s) %s are not in the checkpoint (it stores %d MTP layer(s)); initialised "
                    "fresh (seed %d) for num_mtp_layers=%d", path, [f"mtp_{k}" for k in fresh], stored_mtp,
                    mtp_init_seed, config.num_mtp_layers)
        params.update(_fresh_mtp(config, fresh, dtype, shardings, mtp_init_seed))
    for entry in entries:
        shape = tuple(_tree_get(shapes, entry.path).shape)
        value = _load_entry(st, entry, shape)
        keys = [entry.hf.format(i) for i in range(entry.num)] if entry.kind == "experts" else [entry.hf]
        used.update(keys)
        leaf_dtype = jnp.float32 if _is_f32_leaf(entry.path) else dtype
        sharding = _tree_get(shardings, entry.path) if shardings is not None else None
        _tree_set(params, entry.path, _place(value, leaf_dtype, sharding))
        del value
    unknown = sorted(st.keys() - used)
    if unknown:
        raise CheckpointError(f"{len(unknown)} checkpoint tensors do not belong to this model, e.g. {unknown[:5]}; "
                              "is config.json from the same model?")
    return Transformer(config), params


def _place(value: np.ndarray, dtype, sharding) -> jax.Array:
    value = np.asarray(value, dtype=jnp.dtype(dtype))
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


# ----- writing ---------------------------------------------------------------------------------

def _to_hf(entry: Entry, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    if entry.kind == "copy":
        yield entry.hf, value
    elif entry.kind == "linear":
        yield entry.hf, value.reshape(math.prod(entry.in_shape), math.prod(entry.out_shape)).T
    else:
        for i in range(entry.num):
            yield entry.hf.format(i), value[i].T


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_pretrained(model: Transformer, params, path: str, max_shard_bytes: int = 2 << 30,
                    dtype=np.float32) -> None:
    """Write `config.json` + sharded `*.safetensors` + index in the published layout, in
    `dtype` (float32 or bfloat16; the router and its bias stay float32)."""
    from safetensors.numpy import save_file

    params = layer_stack.unstack_layers(params, model.config)  # the published layout is per layer
    c = model.config.replace(scan_layers=False)
    hf_config = config_to_hf(c)  # refuses configs transformers cannot load, before anything is written
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    tensors: dict[str, np.ndarray] = {}
    for entry in key_map(c):
        value = np.asarray(jax.device_get(_tree_get(params, entry.path)),
                           np.float32 if _is_f32_leaf(entry.path) else jnp.dtype(dtype))
        for key, w in _to_hf(entry, value):
            tensors[key] = np.ascontiguousarray(w)
    for k in range(c.num_mtp_layers):  # V3 layout: each MTP layer carries the shared embedding/head
        hf = f"model.layers.{c.num_hidden_layers + k}"
        tensors[f"{hf}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        tensors[f"{hf}.shared_head.head.weight"] = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    shards: list[dict] = [{}]
    size = 0
    for key, w in tensors.items():
        if size and size + w.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = w
        size += w.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        os.chmod(os.path.join(path, name), 0o666 & ~_umask())  # safetensors writes 0600
        weight_map.update({k: name for k in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map},
                  f, indent=2)
