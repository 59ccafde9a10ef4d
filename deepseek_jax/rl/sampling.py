"""Choosing tokens from logits: temperature, top-k / top-p filtering, and the draw itself.

Dimension legend: B batch (rows), V vocabulary.

Shared by the plain sampler (rl/sampler.py) and MTP speculative decoding (rl/speculative.py).
temperature / top_k / top_p are traced values: changing them never recompiles. Randomness is
per row (`row_keys`): a row's draws depend on (rng, step, row id), not on which other rows
share the batch, so the sampler may drop finished rows from its batch without changing any
row's output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_BxV: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Logits of the sampling distribution: / temperature, then top-k, then top-p (nucleus).

    top_k <= 0 and top_p >= 1 disable the filters; they are traced values, so changing them
    never recompiles. Ties at the top-k / top-p boundary are all kept.
    """
    scaled = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    # Sorting [B, V] is most of a small model's decode step on CPU: skip it when nothing filters.
    return jax.lax.cond((top_k > 0) | (top_p < 1), _top_k_top_p, lambda s, k, p: s, scaled, top_k, top_p)


def _top_k_top_p(scaled, top_k, top_p):
    V = scaled.shape[-1]
    sorted_BxV = jnp.sort(scaled, axis=-1)[:, ::-1]
    rank_V = jnp.arange(V)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_top_k = rank_V[None] < k
    probs_sorted = jax.nn.softmax(jnp.where(in_top_k, sorted_BxV, -jnp.inf), axis=-1)
    # Keep a token while the mass of the strictly better ones is below top_p (always the first).
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep_sorted = in_top_k & (mass_before < top_p)
    threshold_B = jnp.min(jnp.where(keep_sorted, sorted_BxV, jnp.inf), axis=-1)
    return jnp.where(scaled >= threshold_B[:, None], scaled, -jnp.inf)


def row_keys(rng: jax.Array, step, rows_B: jax.Array) -> jax.Array:
    """[B] keys: one per (step, row id)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(rng, step), rows_B)


def uniform(keys_B: jax.Array) -> jax.Array:
    """[B] float32 uniforms in [0, 1), one from each row's key."""
    return jax.vmap(jax.random.uniform)(keys_B)


def draw(keys_B: jax.Array, weights_BxV: jax.Array) -> jax.Array:
    """[B] int32: row b draws index v with probability weights[b, v] / sum(weights[b]).

    Inverse CDF with one uniform per row: `jax.random.categorical` (Gumbel-max) draws a uniform
    per vocabulary entry, and generating and log-transforming those [B, V] numbers was the
    largest piece of a small model's decode step on CPU. Never returns a zero-weight index,
    whatever the rounding of the prefix sums (such a row falls back to its heaviest index).
    """
    cdf_BxV = jnp.cumsum(weights_BxV, axis=-1)
    u_Bx1 = uniform(keys_B)[:, None] * cdf_BxV[:, -1:]
    index_B = jnp.minimum(jnp.sum(cdf_BxV <= u_Bx1, axis=-1), weights_BxV.shape[-1] - 1)
    picked_B = jnp.take_along_axis(weights_BxV, index_B[:, None], axis=-1)[:, 0]
    return jnp.where(picked_B > 0, index_B, jnp.argmax(weights_BxV, axis=-1)).astype(jnp.int32)


def sample_tokens(logits_BxV: jax.Array, keys_B: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """[B] tokens: argmax when temperature == 0, else a draw from `filter_logits` (row b uses keys_B[b])."""
    return jax.lax.cond(
        temperature > 0,
        lambda: draw(keys_B, jax.nn.softmax(filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)),
        lambda: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32))
