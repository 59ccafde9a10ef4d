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
Speculative decoding advances rows by different amounts: there `index` is per row [B]
(`per_row`), writes are per-row slices, and `truncate` rolls a row back after a rejected
draft (its slots past the new index become invalid and the next write overwrites them).
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
    index: jax.Array  # [] int32: the next slot to write, the same for every row ([B] after `per_row`)

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
    """Store T new entries at slots [index, index + T) (`index` [] shared, or [B] per row)."""
    new_BxTx_ = new_BxTx_.astype(buf_BxSx_.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf_BxSx_, new_BxTx_, index, axis=1)
    # Per-row slots: a select against each new entry's one-hot slot, an elementwise update (a
    # vmapped dynamic_update_slice lowers to a scatter); slots past the end are dropped, not clamped.
    B, S, T = buf_BxSx_.shape[0], buf_BxSx_.shape[1], new_BxTx_.shape[1]
    extra = (1,) * (buf_BxSx_.ndim - 2)
    for t in range(T):
        at_BxS = (jnp.arange(S)[None] == (index + t)[:, None]).reshape((B, S) + extra)
        buf_BxSx_ = jnp.where(at_BxS, new_BxTx_[:, t:t + 1], buf_BxSx_)
    return buf_BxSx_


def attend_mask(valid_BxS: jax.Array, index: jax.Array, T: int) -> jax.Array:
    """[B, 1, T, S]: queries at slots index + [0, T) see valid slots up to their own, and always
    themselves (a padding query then has one finite logit, not a NaN row that would poison later
    layers through 0 * NaN)."""
    slot_S = jnp.arange(valid_BxS.shape[1])
    query_BxT = jnp.reshape(index, (-1, 1)) + jnp.arange(T)  # [1 or B, T]
    causal_BxTxS = slot_S <= query_BxT[..., None]
    itself_BxTxS = slot_S == query_BxT[..., None]
    return ((valid_BxS[:, None, :] & causal_BxTxS) | itself_BxTxS)[:, None]


def per_row(cache: KVCache) -> KVCache:
    """The same cache with a per-row write index [B] (what speculative decoding advances)."""
    return cache.replace(index=jnp.broadcast_to(cache.index, cache.valid.shape[:1]).astype(jnp.int32))


def truncate(cache: KVCache, index_B: jax.Array) -> KVCache:
    """Roll each row back to `index_B` slots: later slots become invalid (so unseen by any query
    and absent from `lengths`) and are overwritten by the row's next write."""
    keep_BxS = jnp.arange(cache.max_len)[None] < index_B[:, None]
    return cache.replace(valid=cache.valid & keep_BxS, index=index_B.astype(jnp.int32))


def _map_rows(cache: KVCache, f) -> KVCache:
    """`f` applied to every per-row array (layers, valid, and a per-row index)."""
    index = cache.index if jnp.ndim(cache.index) == 0 else f(cache.index)
    return cache.replace(layers=jax.tree.map(f, cache.layers), valid=f(cache.valid), index=index)


def repeat_rows(cache: KVCache, n: int) -> KVCache:
    """Each row repeated n times (row b -> rows b*n .. b*n+n-1): one prefill shared by n samples."""
    return _map_rows(cache, lambda x: jnp.repeat(x, n, axis=0))


def take_rows(cache: KVCache, rows_B: jax.Array) -> KVCache:
    """The cache of rows `rows_B` only (a decode batch dropping its finished rows)."""
    return _map_rows(cache, lambda x: x[rows_B])


def append(cache: KVCache, valid_BxT: jax.Array) -> tuple[KVCache, jax.Array, jax.Array]:
    """Mark T new slots; returns (cache with valid/index updated, positions [B, T], mask [B, 1, T, S]).

    Positions count real tokens per row (padding repeats the previous position, unused).
    """
    T = valid_BxT.shape[1]
    positions = append_positions(cache, valid_BxT)
    valid = write(cache.valid, valid_BxT, cache.index)
    return cache.replace(valid=valid, index=cache.index + T), positions, attend_mask(valid, cache.index, T)


def append_positions(cache: KVCache, valid_BxT: jax.Array) -> jax.Array:
    """[B, T] RoPE positions of T tokens appended to `cache` (real tokens counted per row)."""
    return jnp.maximum(cache.lengths[:, None] + jnp.cumsum(valid_BxT, axis=1, dtype=jnp.int32) - 1, 0)


def check_room(cache: KVCache, T: int) -> None:
    """Static shapes cannot grow: a write past the end would silently clamp in XLA."""
    if not isinstance(cache.index, jax.core.Tracer) and int(jnp.max(cache.index)) + T > cache.max_len:
        at = int(jnp.max(cache.index))
        raise ValueError(f"KV cache overflow: writing {T} tokens at slot {at} of a "
                         f"{cache.max_len}-slot cache; allocate init_cache(..., max_len>={at + T})")


def cache_nbytes(cache: KVCache, layers: Optional[int] = None) -> int:
    """Bytes held by the per-token buffers (what `bytes_per_token` predicts times B * S)."""
    leaves = jax.tree_util.tree_leaves(cache.layers[:layers] if layers else cache.layers)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
