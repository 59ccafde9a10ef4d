"""KV cache for generation: what each layer keeps per token, and the slot bookkeeping.

Dimension legend: B batch, S cache slots, T new tokens, L layers, C kv latent rank
(kv_lora_rank), R RoPE key dims (qk_rope_head_dim), G kv heads, K head dim (MHA).

Per layer and token, MLA keeps only the normalised latent c_kv [C] and the (already rotated)
decoupled RoPE key k_pe [R] (DeepSeek-V2 §2.1.4: (C + R) * L elements per token); MHA/GQA
keeps the rotated key and the value of every kv head (2 * G * K * L).

Layout: rows share slot indices, and ragged prompts are LEFT-padded. Padding slots are marked
invalid and masked out of attention; each row's RoPE position is the number of real tokens
before it (`lengths`), so a padded row computes exactly what the prompt alone would. One
shared write index keeps every update a single `dynamic_update_slice` in a decode loop.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    layers: tuple  # per layer: {"ckv": [B, S, C], "k_pe": [B, S, R]} (MLA) | {"k", "v": [B, S, G, K]} (MHA)
    valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the next slot to write, the same for every row

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def lengths(self) -> jax.Array:
        """[B] real tokens cached per row: the RoPE position of the row's next token."""
        return self.valid.sum(axis=1, dtype=jnp.int32)


def layer_shapes(config: ModelConfig, batch: int, max_len: int) -> dict:
    c = config
    if c.attention == "mla":
        return {"ckv": (batch, max_len, c.kv_lora_rank), "k_pe": (batch, max_len, c.qk_rope_head_dim)}
    return {"k": (batch, max_len, c.kv_heads, c.mha_head_dim), "v": (batch, max_len, c.kv_heads, c.mha_head_dim)}


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots per row for the main model's layers (not MTP).

    `dtype` defaults to the compute dtype (`config.dtype`), which is what attention reads.
    """
    dt = jnp.dtype(dtype or config.dtype)
    shapes = layer_shapes(config, batch, max_len)
    layers = tuple({k: jnp.zeros(s, dt) for k, s in shapes.items()} for _ in range(config.num_hidden_layers))
    return KVCache(layers=layers, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def bytes_per_token(config: ModelConfig, dtype="bfloat16") -> int:
    """Cache bytes per token from the layer shapes (MTP layers are not cached)."""
    per_layer = sum(math.prod(s[2:]) for s in layer_shapes(config, 1, 1).values())
    return per_layer * config.num_hidden_layers * jnp.dtype(dtype).itemsize


def write(buf_BxSx_: jax.Array, new_BxTx_: jax.Array, index: jax.Array) -> jax.Array:
    """Store T new entries at slots [index, index + T)."""
    return jax.lax.dynamic_update_slice_in_dim(buf_BxSx_, new_BxTx_.astype(buf_BxSx_.dtype), index, axis=1)


def append(cache: KVCache, valid_BxT: jax.Array) -> tuple[KVCache, jax.Array, jax.Array]:
    """Mark T new slots; returns (cache with valid/index updated, positions [B, T], mask [B, 1, T, S]).

    Positions count real tokens per row (padding repeats the previous position, unused).
    A query sees valid slots up to its own, and always itself: a padding query then has one
    finite logit instead of a NaN row that would poison later layers through 0 * NaN.
    """
    T = valid_BxT.shape[1]
    positions = cache.lengths[:, None] + jnp.cumsum(valid_BxT, axis=1, dtype=jnp.int32) - 1
    positions = jnp.maximum(positions, 0)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid_BxT, cache.index, axis=1)
    slot_S = jnp.arange(cache.max_len)
    query_T = cache.index + jnp.arange(T)
    causal_TxS = slot_S[None, :] <= query_T[:, None]
    mask_BxTxS = (valid[:, None, :] & causal_TxS[None]) | (slot_S[None, :] == query_T[:, None])[None]
    return cache.replace(valid=valid, index=cache.index + T), positions, mask_BxTxS[:, None]


def check_room(cache: KVCache, T: int) -> None:
    """Static shapes cannot grow: a write past the end would silently clamp in XLA."""
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + T > cache.max_len:
        raise ValueError(f"KV cache overflow: writing {T} tokens at slot {int(cache.index)} of a "
                         f"{cache.max_len}-slot cache; allocate init_cache(..., max_len>={int(cache.index) + T})")


def cache_nbytes(cache: KVCache, layers: Optional[int] = None) -> int:
    """Bytes held by the per-token buffers (what `bytes_per_token` predicts times B * S)."""
    leaves = jax.tree_util.tree_leaves(cache.layers[:layers] if layers else cache.layers)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
