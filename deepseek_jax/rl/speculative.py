"""MTP self-speculative decoding (DeepSeek-V3 §5.4.3): the main model verifies MTP's one-token draft.

Dimension legend: B batch (rows), P prompt slots, N new-token slots, V vocabulary, D model width.

A row's state is its tokens s_0..s_m (s_m sampled but not yet fed to the main model), the main
model's KV cache for positions 0..m-1, MTP module 0's own KV cache for the same positions, and a
draft d for s_{m+1} (MTP at position m-1 sees h_{m-1} and s_m and predicts two tokens ahead).
One step:
  1. the main model runs [s_m, d] at positions m, m+1 in one forward through the cache
     (MLA latent cache with absorbed weights, or GQA);
  2. d is accepted with probability p(d), p the sampling distribution at position m (temperature,
     top-k, top-p applied; greedy: iff d is the argmax), else s_{m+1} is drawn from p with d
     removed and renormalised. For a point-mass draft this is Leviathan et al.'s speculative
     sampling rule (arXiv:2211.17192, accept min(1, p/q) with q = 1 at d, residual
     norm(max(0, p - q))), so s_{m+1} ~ p exactly. If accepted, the second position's logits
     give s_{m+2} for free (the "bonus" token), drawn from p as the plain sampler would;
  3. the cache is rolled back to the accepted length (`kv_cache.truncate`: a rejected slot is
     invalid, hence invisible, and the row's next write overwrites it);
  4. MTP module 0 runs on the 1 or 2 new positions (h from step 1, the embedding of the token
     after each) through its cache and drafts the next d (argmax: a point mass).
Rows advance by 1 or 2 tokens per step under one `lax.while_loop` with static shapes: the cache
write index is per row. Log-probs are the main model's temperature-1 log-softmax at each
emitted token, as in the plain sampler.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import kv_cache
from deepseek_jax.attention import PrefillMask, attention_mask
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Dense, Embed, rope_cos_sin
from deepseek_jax.model import MTPModule, shift_left
from deepseek_jax.rl.sampling import draw, filter_logits, uniform


class MTPDraft(nn.Module):
    """MTP module 0 with a KV cache, applied to the Transformer's own parameter tree (it reads
    `embed`, `mtp_0` and `lm_head`): logits [B, T, V] predicting two tokens past each position."""

    config: ModelConfig

    @nn.compact
    def __call__(self, h_prev_BxTxD, next_BxT, positions_BxT, mask, valid_BxT, layer, index, absorbed=True):
        c = self.config
        dt = jnp.dtype(c.dtype)
        embed = Embed(c.vocab_size, c.hidden_size, dt, name="embed")
        cos, sin = rope_cos_sin(positions_BxT, c)
        _, h_out, _, layer = MTPModule(c, name="mtp_0")(h_prev_BxTxD, embed(next_BxT), cos, sin, mask, valid_BxT,
                                                        cache=layer, index=index, absorbed=absorbed)
        if c.tie_word_embeddings:
            head = embed.attend
        else:  # the same head as Transformer's (float32 logits)
            head = Dense((c.hidden_size,), (c.vocab_size,), ("embed", "vocab"), dt, jnp.float32, name="lm_head")
        return head(h_out), layer


def init_mtp_layer(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty cache layer for MTP module 0's attention (same layout as a main layer's)."""
    dt = jnp.dtype(dtype or config.dtype)
    return {k: jnp.zeros(s, dt) for k, s in kv_cache.layer_shapes(config, batch, max_len).items()}


def mtp_prefill(config, params, hidden_BxPxD, prompt_BxP, valid_BxP, layer):
    """MTP's cache for prompt slots 0..P-1. The last slot needs the first sampled token, unknown
    here (and different for each of a group's samples): it is written with a placeholder that
    `mtp_first_draft` overwrites per row."""
    P = prompt_BxP.shape[1]
    positions = jnp.maximum(jnp.cumsum(valid_BxP, axis=1, dtype=jnp.int32) - 1, 0)
    # The prompt's slots attend among themselves, as in the main model's prefill (PrefillMask).
    mask = PrefillMask(attention_mask(valid_BxP.astype(jnp.int32), P, config.attention_impl))
    _, layer = MTPDraft(config).apply({"params": params}, hidden_BxPxD, shift_left(prompt_BxP), positions, mask,
                                      valid_BxP, layer, jnp.int32(0), False)
    return layer


def draft_logits(config, params, hidden_BxTxD, next_BxT, cache: kv_cache.KVCache, index_B, lengths_B, valid_BxT,
                 layer, absorbed=True):
    """MTP over T positions written at per-row slots index_B + [0, T) (RoPE positions lengths_B + [0, T)),
    given the main cache's validity for those slots -> (logits [B, T, V], layer)."""
    T = next_BxT.shape[1]
    positions = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)
    mask = kv_cache.attend_mask(cache.valid, index_B, T)
    return MTPDraft(config).apply({"params": params}, hidden_BxTxD, next_BxT, positions, mask, valid_BxT, layer,
                                  index_B, absorbed)


def accept_draft(logits_BxV, draft_B, keys_B, temperature, top_k, top_p):
    """(accepted [B], s_{m+1} [B]): speculative sampling for a point-mass draft (module docstring).

    `logits_BxV` are the main model's (vocabulary-limited) logits at position m; greedy when
    temperature == 0. Row b's randomness comes from keys_B[b].
    """
    k_accept_B, k_residual_B = jnp.moveaxis(jax.vmap(jax.random.split)(keys_B), 1, 0)
    p_BxV = jax.nn.softmax(filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)
    p_draft_B = jnp.take_along_axis(p_BxV, draft_B[:, None], axis=-1)[:, 0]
    accepted_B = uniform(k_accept_B) < p_draft_B
    is_draft_BxV = jnp.arange(logits_BxV.shape[-1])[None] == draft_B[:, None]
    residual_B = draw(k_residual_B, jnp.where(is_draft_BxV, 0.0, p_BxV))  # p without d, renormalised
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    accepted_B = jnp.where(temperature > 0, accepted_B, draft_B == greedy_B)
    token_B = jnp.where(accepted_B, draft_B, jnp.where(temperature > 0, residual_B, greedy_B))
    return accepted_B, token_B.astype(jnp.int32)
