"""Output head + per-token objectives without materialising the [tokens, V] logits.

Dimension legend: B batch, T time, D model width, V vocabulary, n time positions per chunk,
nc chunks.

The head of V3 (V = 129,280) on a 4K-token sequence makes 2.1 GB of float32 logits, and
their gradient as much again. `map_head(fn, h, w, ...)` instead runs the head matmul on
chunks of n positions (every row at once, so the batch sharding is untouched), applies
`fn` (log-softmax, the target's log-prob, entropy, a KL against a teacher ...: float32,
logsumexp over the whole vocabulary) to each [B, n, V] chunk, and keeps only its [B, n]
outputs. Each chunk is under `jax.checkpoint` inside a `lax.scan`, so the backward
recomputes the chunk's logits rather than storing them: the head's temporary memory is one
chunk, whatever T, and grows with V only through that chunk. dW is accumulated by the
scan's transpose. When all of T fits in one chunk (small vocabularies) it is the plain
computation, unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from deepseek_jax.expert_parallel import batch_shards, per_device
from deepseek_jax.layers import matmul_2d

# Logit elements per chunk over one device's rows (float32: 256 MB): at V3's vocabulary, 519
# positions of a 4K-token row. Chunking is not free (the backward recomputes the chunk's
# logits: 4 head matmuls instead of 3, and the scan's bookkeeping), so a head whose logits
# fit in one chunk runs whole: the bench model's [8 x 256, 32000] float32 step took ~1.2 s on
# a 2-core Xeon against 1.6-1.9 s with 131-position chunks (train_step_vs_hf.py --no_hf).
CHUNK_ELEMENTS = 1 << 26


def default_chunk(vocab_size: int, rows: int = 1) -> int:
    """Time positions per chunk so that `rows` rows' chunk of logits holds <= CHUNK_ELEMENTS values."""
    return max(1, CHUNK_ELEMENTS // (rows * vocab_size))


def head_logits(h_BxTxD: jax.Array, w_DxV: jax.Array, dtype) -> jax.Array:
    """float32 logits of the output head, as the model's lm_head computes them (layers.Dense)."""
    return matmul_2d(h_BxTxD.astype(dtype), w_DxV, 1)


def _chunks(x_BxTx_: jax.Array, n: int, nc: int) -> jax.Array:
    """[B, T, ...] -> [nc, B, n, ...] (zero-padded along T)."""
    B, T = x_BxTx_.shape[:2]
    pad = nc * n - T
    if pad:
        x_BxTx_ = jnp.pad(x_BxTx_, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxTx_.ndim - 2))
    return jnp.moveaxis(x_BxTx_.reshape(B, nc, n, *x_BxTx_.shape[2:]), 1, 0)


def map_head(fn: Callable[..., Any], h_BxTxD: jax.Array, w_DxV: jax.Array, *extras_BxTx_: jax.Array,
             dtype=jnp.float32, chunk: Optional[int] = None) -> Any:
    """fn(head_logits(h, w), *extras) computed chunk by chunk along T; a pytree of [B, T, ...].

    `fn(logits_BxnxV, *extras_Bxn_)` must be position-wise: each output [B, n, ...] entry
    depends only on its own position's logits and extras. `chunk` is the number of positions
    per chunk; by default `default_chunk(V, rows)`, rows being one device's share of B.

    Under a mesh each device scans its own rows (`expert_parallel.per_device`) with the whole
    head weight, gathered once per call, and sums its own dW over the chunks; the devices'
    dW are reduced once at the end. Under plain jit XLA all-gathers the sharded weight and
    all-reduces its gradient inside the loop, once per chunk: for V3's head (3.7 GB in
    float32) at T = 4096 that is 128 of each per step.
    """
    B, T = h_BxTxD.shape[:2]
    n = chunk or default_chunk(w_DxV.shape[-1], B // batch_shards(B))
    if n >= T:
        return fn(head_logits(h_BxTxD, w_DxV, dtype), *extras_BxTx_)
    nc = -(-T // n)

    def rows(h_BxTxD, *rest):  # `rest` = extras, then the weight
        *extras, w_DxV = rest

        @jax.checkpoint  # saves only the chunk's inputs; the [B, n, V] logits are recomputed
        def one(h_c, *extras_c):
            return fn(head_logits(h_c, w_DxV, dtype), *extras_c)

        xs = (_chunks(h_BxTxD, n, nc),) + tuple(_chunks(e, n, nc) for e in extras)
        _, ys = jax.lax.scan(lambda carry, x: (carry, one(*x)), None, xs)
        b = h_BxTxD.shape[0]
        return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(b, nc * n, *y.shape[3:])[:, :T], ys)

    return per_device(rows, (h_BxTxD, *extras_BxTx_), (w_DxV,))
