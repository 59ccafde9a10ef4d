"""ModelConfig: one frozen dataclass for DeepSeek V1 (dense), V2 and V3 (MLA + DeepSeekMoE + MTP).

Model code receives only this object, never the experiment ConfigDict (STYLE.md rule 1).
Field names follow the Hugging Face `config.json` of the published checkpoints where one
exists, so `hf.py` maps them one to one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A configuration that cannot work; raised before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (arXiv:2309.00071; DeepSeek-V2 Appendix, V3 §4.3)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 264
    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128  # dense SwiGLU width (V1 layers and the first_k_dense_replace layers)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    # Attention: "mha" (V1; GQA when num_key_value_heads < num_attention_heads) or "mla" (V2/V3).
    attention: str = "mla"
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # mha only; None = num_attention_heads
    head_dim: Optional[int] = None  # mha only; None = hidden_size // num_attention_heads
    q_lora_rank: Optional[int] = None  # mla: None = direct q projection (V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # DeepSeek checkpoints pair dims (0,1),(2,3)..; Llama uses halves
    rope_scaling: Optional[RopeScaling] = None

    # DeepSeekMoE. n_routed_experts == 0 makes every layer dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"  # "softmax" (V2) | "sigmoid" (V3)
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (V2 device-limited) | "top2_sum" (V3 node-limited)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # V3 e_score_correction_bias: steers selection only

    # Multi-Token Prediction depth (V3 §2.2). 0 disables it.
    num_mtp_layers: int = 0

    # Execution choices (results must not depend on them).
    dtype: str = "float32"  # activation/compute dtype; parameters stay float32
    moe_dispatch: str = "dropless"  # "dropless" | "capacity" | "dense"
    capacity_factor: float = 1.25
    # Which copies capacity dispatch drops (dispatch.py): "affinity" = DeepSeek-V2 §2.2.4 (per
    # device, lowest affinity first; capacity_factor is per device) | "gshard" (per expert,
    # first choices first, then token order). Training only: inference runs dropless.
    capacity_policy: str = "affinity"
    capacity_protected_fraction: float = 0.1  # "affinity": rows never dropped (moe.protected_rows)
    # Expert-parallel exchange buffers of dropless dispatch (expert_parallel.py). None: the
    # worst case, n * min(K, E / P) copies per peer, never overflows (P * min(K, E / P) / K
    # times what a balanced router sends: 32x for V3 on 64 expert devices). A factor f sizes
    # them f * n * K / P copies per peer instead; copies past a full buffer are dropped and
    # counted (moe/drop_rate). Training only: inference keeps the worst case.
    ep_buffer_factor: Optional[float] = None
    routing_impl: str = "xla"  # "auto" | "pallas" | "xla"
    remat: str = "none"  # "none" | "full" | "dots" (checkpoint policy per block)
    # "reference" (the [T, S] score matrix; the test oracle), "blockwise" (online softmax,
    # memory linear in T; blockwise_attention.py) or "auto" (resolve_attention_impl picks).
    attention_impl: str = "auto"
    # Run the layers as two `nn.scan` stacks (the dense prefix, then the MoE layers;
    # layer_stack.py): compile time and program size stop growing with depth. Parameters
    # then carry a leading "layers" axis; layer_stack.stack_layers / unstack_layers convert
    # between the two layouts (Hugging Face import/export and inspect use the per-layer one).
    scan_layers: bool = False

    def __post_init__(self):
        validate(self)

    # ----- derived quantities -------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.is_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def mha_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.mha_head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(names)}")
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, RopeScaling):
            d["rope_scaling"] = RopeScaling(**dict(rs))
        return cls(**d)


def _check(cond: bool, field: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"model.{field}={value!r}: {fix}")


def validate(c: ModelConfig) -> None:
    """Reject configurations that cannot work, naming the field, the value and the fix."""
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        _check(getattr(c, f) > 0, f, getattr(c, f), "must be a positive integer")
    _check(c.attention in ("mha", "mla"), "attention", c.attention, "use 'mha' (V1) or 'mla' (V2/V3)")
    _check(c.dtype in ("float32", "bfloat16", "float16"), "dtype", c.dtype,
           "use 'float32' or 'bfloat16'")
    if c.attention == "mha":
        _check(c.num_attention_heads % c.kv_heads == 0, "num_key_value_heads", c.num_key_value_heads,
               f"must divide num_attention_heads={c.num_attention_heads} (GQA groups)")
        _check(c.head_dim is not None or c.hidden_size % c.num_attention_heads == 0, "hidden_size",
               c.hidden_size, f"must be divisible by num_attention_heads={c.num_attention_heads}, "
               "or set head_dim explicitly")
        _check(c.mha_head_dim % 2 == 0, "head_dim", c.mha_head_dim, "RoPE needs an even head_dim")
    else:
        _check(c.kv_lora_rank > 0, "kv_lora_rank", c.kv_lora_rank, "MLA needs a positive latent rank")
        _check(c.q_lora_rank is None or c.q_lora_rank > 0, "q_lora_rank", c.q_lora_rank,
               "use None for a direct query projection, or a positive rank")
        _check(c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
               c.qk_rope_head_dim, "the decoupled RoPE key needs a positive even size")
        _check(c.qk_nope_head_dim > 0, "qk_nope_head_dim", c.qk_nope_head_dim, "must be positive")
        _check(c.v_head_dim > 0, "v_head_dim", c.v_head_dim, "must be positive")
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        _check(rs.factor >= 1.0, "rope_scaling.factor", rs.factor, "YaRN factor must be >= 1")
        _check(rs.beta_fast > rs.beta_slow > 0, "rope_scaling.beta_fast", (rs.beta_fast, rs.beta_slow),
               "need beta_fast > beta_slow > 0 (DeepSeek uses 32 and 1)")
    _check(c.num_mtp_layers >= 0, "num_mtp_layers", c.num_mtp_layers, "must be >= 0")
    _check(isinstance(c.scan_layers, bool), "scan_layers", c.scan_layers, "use True or False")
    _check(c.remat in ("none", "full", "dots"), "remat", c.remat, "use 'none', 'full' or 'dots'")
    _check(c.moe_dispatch in ("dropless", "capacity", "dense"), "moe_dispatch", c.moe_dispatch,
           "use 'dropless', 'capacity' or 'dense'")
    _check(c.capacity_factor > 0, "capacity_factor", c.capacity_factor,
           "must be > 0 (1.0 = exactly the average load per expert; 1.25 is a common choice)")
    _check(c.capacity_policy in ("affinity", "gshard"), "capacity_policy", c.capacity_policy,
           "use 'affinity' (DeepSeek-V2 token dropping) or 'gshard' (per-expert capacity)")
    _check(c.ep_buffer_factor is None or c.ep_buffer_factor > 0, "ep_buffer_factor", c.ep_buffer_factor,
           "use None (exactly dropless) or a factor > 0 over the balanced share (e.g. 2.0)")
    _check(c.ep_buffer_factor is None or c.moe_dispatch == "dropless", "ep_buffer_factor", c.ep_buffer_factor,
           f"sizes dropless dispatch's buffers; with moe_dispatch={c.moe_dispatch!r} set it to None")
    _check(0.0 <= c.capacity_protected_fraction <= 1.0, "capacity_protected_fraction",
           c.capacity_protected_fraction, "must be in [0, 1] (DeepSeek-V2 protects ~0.1 of the sequences)")
    _check(c.routing_impl in ("auto", "pallas", "xla"), "routing_impl", c.routing_impl,
           "use 'auto', 'pallas' or 'xla'")
    _check(c.attention_impl in ("auto", "reference", "blockwise", "flash"), "attention_impl", c.attention_impl,
           "use 'auto', 'reference', 'blockwise' or 'flash' (GPU: tokamax's kernel, gpu_kernels.py)")
    if not c.is_moe:
        return
    E, K = c.n_routed_experts, c.num_experts_per_tok
    _check(c.scoring_func in ("softmax", "sigmoid"), "scoring_func", c.scoring_func,
           "use 'softmax' (V2) or 'sigmoid' (V3)")
    _check(c.group_score in ("max", "top2_sum"), "group_score", c.group_score,
           "use 'max' (V2) or 'top2_sum' (V3)")
    _check(c.n_group >= 1 and E % c.n_group == 0, "n_group", c.n_group,
           f"n_routed_experts={E} must be divisible by n_group")
    _check(1 <= c.topk_group <= c.n_group, "topk_group", c.topk_group,
           f"must be between 1 and n_group={c.n_group}")
    per_group = E // c.n_group
    if c.group_score == "top2_sum" and c.n_group > 1:
        _check(per_group >= 2, "n_group", c.n_group,
               f"top2_sum group scores need >= 2 experts per group; got {per_group}")
    _check(1 <= K <= c.topk_group * per_group, "num_experts_per_tok", K,
           f"must be between 1 and topk_group * experts_per_group = {c.topk_group} * {per_group}"
           f" = {c.topk_group * per_group} (the experts the group limit leaves)")
    _check(c.moe_intermediate_size > 0, "moe_intermediate_size", c.moe_intermediate_size,
           "must be positive")
    _check(c.moe_layer_freq >= 1, "moe_layer_freq", c.moe_layer_freq, "must be >= 1")
    _check(0 <= c.first_k_dense_replace <= c.num_hidden_layers, "first_k_dense_replace",
           c.first_k_dense_replace, f"must be between 0 and num_hidden_layers={c.num_hidden_layers}")
