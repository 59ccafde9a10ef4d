"""Attention: MHA/GQA (DeepSeek V1, Llama layout) and Multi-head Latent Attention (V2/V3).

Dimension legend: B batch, T query time, S key time, D model width, H query heads,
G kv heads (GQA), K head dim (MHA), C kv latent rank (kv_lora_rank), Q query latent rank,
N no-RoPE q/k dims (qk_nope_head_dim), R RoPE dims (qk_rope_head_dim), A value dims (v_head_dim).

MLA (DeepSeek-V2 §2.1, eq. 9-19): keys and values come from a shared latent
c_kv = RMSNorm(W_DKV x) [C] plus one decoupled RoPE key k_pe = RoPE(W_KR x) [R] shared by all
heads; the training path up-projects the latent to per-head k_nope [N] and v [A].
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Dense, RMSNorm, apply_rope, constrain, softmax_scale


def attention_mask(segment_ids_BxT: Optional[jax.Array], T: int) -> jax.Array:
    """[B or 1, 1, T, T] boolean: causal, and (when packing) only within the same document."""
    causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
    if segment_ids_BxT is None:
        return causal_TxS[None, None]
    same_doc = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal_TxS[None] & same_doc)[:, None]


def dot_product_attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxA: jax.Array,
                          mask_Bx1xTxS: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale + mask) v with the softmax in float32."""
    logits = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask_Bx1xTxS, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxHxA.dtype)
    return jnp.einsum("bhts,bsha->btha", probs, v_BxSxHxA, preferred_element_type=jnp.float32
                      ).astype(v_BxSxHxA.dtype)


class MHA(nn.Module):
    """Multi-head attention with optional grouped KV heads (GQA; DeepSeek LLM 67B)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask):
        c = self.config
        dt = jnp.dtype(c.dtype)
        D, H, G, K = c.hidden_size, c.num_attention_heads, c.kv_heads, c.mha_head_dim
        q = Dense((D,), (H, K), ("embed", "heads", "head_dim"), dt, name="q_proj")(x_BxTxD)
        k = Dense((D,), (G, K), ("embed", "kv_heads", "head_dim"), dt, name="k_proj")(x_BxTxD)
        v = Dense((D,), (G, K), ("embed", "kv_heads", "head_dim"), dt, name="v_proj")(x_BxTxD)
        q = apply_rope(q, cos, sin, c.rope_interleave)
        k = apply_rope(k, cos, sin, c.rope_interleave)
        k, v = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
        out = dot_product_attention(q, k, v, mask, softmax_scale(K, None))
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return Dense((H, K), (D,), ("heads", "head_dim", "embed"), dt, name="o_proj")(out)


class MLA(nn.Module):
    """Multi-head Latent Attention, training path (full sequence, no cache)."""

    config: ModelConfig

    def project_q(self, x_BxTxD):
        """Per-head queries [B, T, H, N+R], through the low-rank Q path when q_lora_rank is set."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        D, H = c.hidden_size, c.num_attention_heads
        if c.q_lora_rank is None:
            return Dense((D,), (H, c.qk_head_dim), ("embed", "heads", "head_dim"), dt, name="q_proj")(x_BxTxD)
        Q = c.q_lora_rank
        cq = Dense((D,), (Q,), ("embed", "q_lora"), dt, name="q_a_proj")(x_BxTxD)
        cq = RMSNorm(c.rms_norm_eps, name="q_a_norm")(cq)
        return Dense((Q,), (H, c.qk_head_dim), ("q_lora", "heads", "head_dim"), dt, name="q_b_proj")(cq)

    def project_kv_latent(self, x_BxTxD):
        """The per-token cache content: normalised latent c_kv [B, T, C] and raw k_pe [B, T, R]."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        C, R = c.kv_lora_rank, c.qk_rope_head_dim
        ckv_pe = Dense((c.hidden_size,), (C + R,), ("embed", "kv_lora"), dt, name="kv_a_proj")(x_BxTxD)
        ckv, k_pe = ckv_pe[..., :C], ckv_pe[..., C:]
        return RMSNorm(c.rms_norm_eps, name="kv_a_norm")(ckv), k_pe

    def kv_up_kernel(self):
        """W_UK and W_UV stacked: [C, H, N + A] (kv_b_proj)."""
        c = self.config
        return self.param(
            "kv_b_proj", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("kv_lora", "heads", "head_dim")),
            (c.kv_lora_rank, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim), jnp.float32)

    def out_kernel(self):
        c = self.config
        return self.param(
            "o_proj", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("heads", "head_dim", "embed")),
            (c.num_attention_heads, c.v_head_dim, c.hidden_size), jnp.float32)

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask):
        c = self.config
        dt = jnp.dtype(c.dtype)
        N = c.qk_nope_head_dim
        q = self.project_q(x_BxTxD)
        q_nope, q_pe = q[..., :N], q[..., N:]
        ckv_BxTxC, k_pe_BxTxR = self.project_kv_latent(x_BxTxD)
        q_pe = apply_rope(q_pe, cos, sin, c.rope_interleave)
        k_pe_BxTx1xR = apply_rope(k_pe_BxTxR[:, :, None, :], cos, sin, c.rope_interleave)

        kv = jnp.einsum("btc,chk->bthk", ckv_BxTxC, self.kv_up_kernel().astype(dt),
                        preferred_element_type=jnp.float32).astype(dt)
        k_nope, v_BxTxHxA = kv[..., :N], kv[..., N:]
        k_BxTxHx_ = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe_BxTx1xR, k_nope.shape[:3] + (c.qk_rope_head_dim,))],
                                    axis=-1)
        q_BxTxHx_ = jnp.concatenate([q_nope, q_pe], axis=-1)
        q_BxTxHx_ = constrain(q_BxTxHx_, ("batch", "length", "heads", "head_dim"))
        k_BxTxHx_ = constrain(k_BxTxHx_, ("batch", "length", "heads", "head_dim"))
        out = dot_product_attention(q_BxTxHx_, k_BxTxHx_, v_BxTxHxA, mask,
                                    softmax_scale(c.qk_head_dim, c.rope_scaling))
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return jnp.einsum("btha,had->btd", out, self.out_kernel().astype(dt),
                          preferred_element_type=jnp.float32).astype(dt)
