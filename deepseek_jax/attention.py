"""Attention: MHA/GQA (DeepSeek V1, Llama layout) and Multi-head Latent Attention (V2/V3).

Dimension legend: B batch, T query time, S key time, D model width, H query heads,
G kv heads (GQA), K head dim (MHA), C kv latent rank (kv_lora_rank), Q query latent rank,
N no-RoPE q/k dims (qk_nope_head_dim), R RoPE dims (qk_rope_head_dim), A value dims (v_head_dim).

MLA (DeepSeek-V2 §2.1, eq. 9-19): keys and values come from a shared latent
c_kv = RMSNorm(W_DKV x) [C] plus one decoupled RoPE key k_pe = RoPE(W_KR x) [R] shared by all
heads; the training path up-projects the latent to per-head k_nope [N] and v [A].

Generation (`cache=` a per-layer dict from `kv_cache`, with the slot `index` and the cache
mask): new tokens are written into the cache first, then attend over every slot. MLA caches
only (c_kv, RoPE(k_pe)) and by default decodes ABSORBED (V2 §2.1.2, DeepSeek's reference
`attn_impl="absorb"`): W_UK is folded into the query, q_nope W_UK^T [C], so scores are taken
against the latent directly, and W_UV is applied after the probability-weighted latent sum,
so per-head keys and values are never materialised. `absorbed=False` expands K/V from the
cached latent instead (the naive decode: test oracle and benchmark baseline).
A prefill into an empty cache (`PrefillMask`) attends among its own T tokens instead, with
attention_impl's kernel (blockwise on CPU, flash on GPU): no [T, S] mask over the cache slots.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import gpu_kernels, kv_cache
from deepseek_jax.blockwise_attention import CausalSegmentMask, blockwise_attention, resolve_attention_impl
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Dense, RMSNorm, apply_rope, cast, constrain, einsum_f32, matmul_2d, softmax_scale

# MLA's latent norms (q_a_layernorm, kv_a_layernorm) use a fixed eps, whatever rms_norm_eps
# says: DeepSeek's released code and transformers build them as RMSNorm(rank) with the
# default 1e-6 (rms_norm_eps only reaches the per-layer and final norms).
LATENT_NORM_EPS = 1e-6


def attention_mask(segment_ids_BxT: Optional[jax.Array], T: int, impl: str = "reference"):
    """[B or 1, 1, T, T] boolean: causal, and (when packing) only within the same document.

    When `impl` (ModelConfig.attention_impl) resolves to "blockwise", the same mask described
    per position (CausalSegmentMask), which `attend` evaluates block by block.
    """
    resolved = resolve_attention_impl(impl)
    if resolved == "flash":
        return gpu_kernels.FlashMask(segment_ids_BxT)
    if resolved == "blockwise":
        return CausalSegmentMask(segment_ids_BxT)
    causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
    if segment_ids_BxT is None:
        return causal_TxS[None, None]
    same_doc = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal_TxS[None] & same_doc)[:, None]


@dataclasses.dataclass(frozen=True)
class PrefillMask:
    """The mask of a prefill into an empty cache (Transformer(prefill=True)): the T new tokens,
    written at slots [0, T), attend among themselves under `inner` (`attention_mask`'s, so a
    CausalSegmentMask or FlashMask where attention_impl picks blockwise or flash) rather than
    over all S slots. With segment ids 1 = prompt, 0 = left padding, a prompt token sees the
    same keys as under `kv_cache.attend_mask`; padding queries (never read) see padding."""

    inner: Any


def attend(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxA: jax.Array, mask, scale: float) -> jax.Array:
    """Attention with G kv heads for H query heads: blockwise for a CausalSegmentMask (no
    [T, S] matrix), else the reference `dot_product_attention` over the dense boolean mask."""
    if isinstance(mask, gpu_kernels.FlashMask):
        return gpu_kernels.flash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxA, scale=scale, causal=True,
                                           segment_ids=mask.segment_ids)
    if isinstance(mask, CausalSegmentMask):
        return blockwise_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxA, scale=scale, causal=True,
                                   segment_ids=mask.segment_ids)
    J = q_BxTxHxK.shape[2] // k_BxSxGxK.shape[2]
    if J > 1:
        k_BxSxGxK, v_BxSxGxA = jnp.repeat(k_BxSxGxK, J, axis=2), jnp.repeat(v_BxSxGxA, J, axis=2)
    return dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxA, mask, scale)


def dot_product_attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxA: jax.Array,
                          mask_Bx1xTxS: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale + mask) v with the softmax in float32."""
    logits = einsum_f32("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK) * scale
    logits = jnp.where(mask_Bx1xTxS, logits, -jnp.inf)
    probs = cast(jax.nn.softmax(logits, axis=-1), v_BxSxHxA.dtype)
    return cast(einsum_f32("bhts,bsha->btha", probs, v_BxSxHxA), v_BxSxHxA.dtype)


class MHA(nn.Module):
    """Multi-head attention with optional grouped KV heads (GQA; DeepSeek LLM 67B)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask, cache=None, index=None, absorbed=True):
        """Returns y [B, T, D], or (y, updated layer cache) when `cache` is given."""
        del absorbed  # MLA-only choice; accepted so Block can call either attention alike
        c = self.config
        dt = jnp.dtype(c.dtype)
        D, H, G, K = c.hidden_size, c.num_attention_heads, c.kv_heads, c.mha_head_dim
        q = Dense((D,), (H, K), ("embed", "heads", "head_dim"), dt, name="q_proj")(x_BxTxD)
        k = Dense((D,), (G, K), ("embed", "kv_heads", "head_dim"), dt, name="k_proj")(x_BxTxD)
        v = Dense((D,), (G, K), ("embed", "kv_heads", "head_dim"), dt, name="v_proj")(x_BxTxD)
        q = apply_rope(q, cos, sin, c.rope_interleave)
        k = apply_rope(k, cos, sin, c.rope_interleave)
        o_proj = Dense((H, K), (D,), ("heads", "head_dim", "embed"), dt, name="o_proj")
        if cache is not None:
            axes = ("batch", "length", "kv_heads", "head_dim")  # rows stay with their data shard
            cache = {"k": constrain(kv_cache.write(cache["k"], k, index), axes),
                     "v": constrain(kv_cache.write(cache["v"], v, index), axes)}
            # The keys and values as the cache holds them (its dtype may round them).
            k_BxSxGxK, v_BxSxGxK = cache["k"].astype(dt), cache["v"].astype(dt)
            if isinstance(mask, PrefillMask):
                T = x_BxTxD.shape[1]
                out = attend(q, k_BxSxGxK[:, :T], v_BxSxGxK[:, :T], mask.inner, softmax_scale(K, None))
            else:
                out = grouped_attention(q, k_BxSxGxK, v_BxSxGxK, mask, softmax_scale(K, None))
            return o_proj(out), cache
        out = attend(q, k, v, mask, softmax_scale(K, None))
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return o_proj(out)


def grouped_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, scale: float) -> jax.Array:
    """GQA over cached keys without repeating them H/G times (J = H/G queries per kv head)."""
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxSxGxK.shape[2]
    q_BxTxGxJxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
    logits = einsum_f32("btgjk,bsgk->bgjts", q_BxTxGxJxK, k_BxSxGxK) * scale
    logits = jnp.where(mask_Bx1xTxS[:, :, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxGxK.dtype)
    out = einsum_f32("bgjts,bsgk->btgjk", probs, v_BxSxGxK)
    return out.reshape(B, T, H, K).astype(v_BxSxGxK.dtype)


class MLA(nn.Module):
    """Multi-head Latent Attention: training path, and cached prefill / decode (absorbed or naive)."""

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
        cq = RMSNorm(LATENT_NORM_EPS, name="q_a_norm")(cq)
        return Dense((Q,), (H, c.qk_head_dim), ("q_lora", "heads", "head_dim"), dt, name="q_b_proj")(cq)

    def project_kv_latent(self, x_BxTxD):
        """The per-token cache content: normalised latent c_kv [B, T, C] and raw k_pe [B, T, R]."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        C, R = c.kv_lora_rank, c.qk_rope_head_dim
        ckv_pe = Dense((c.hidden_size,), (C + R,), ("embed", "kv_lora"), dt, name="kv_a_proj")(x_BxTxD)
        ckv, k_pe = ckv_pe[..., :C], ckv_pe[..., C:]
        return RMSNorm(LATENT_NORM_EPS, name="kv_a_norm")(ckv), k_pe

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

    def expanded_attention(self, q_nope, q_pe, ckv_BxSxC, k_pe_BxSxR, mask):
        """Per-head K/V up-projected from the latent, then plain attention -> [B, T, H, A]."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        N = c.qk_nope_head_dim
        kv = cast(matmul_2d(ckv_BxSxC, self.kv_up_kernel().astype(dt), 1), dt)
        k_nope, v_BxSxHxA = kv[..., :N], kv[..., N:]
        k_BxSxHx_ = jnp.concatenate(
            [k_nope, jnp.broadcast_to(k_pe_BxSxR[:, :, None, :], k_nope.shape[:3] + (c.qk_rope_head_dim,))], axis=-1)
        q_BxTxHx_ = jnp.concatenate([q_nope, q_pe], axis=-1)
        q_BxTxHx_ = constrain(q_BxTxHx_, ("batch", "length", "heads", "head_dim"))
        k_BxSxHx_ = constrain(k_BxSxHx_, ("batch", "length", "heads", "head_dim"))
        return attend(q_BxTxHx_, k_BxSxHx_, v_BxSxHxA, mask, softmax_scale(c.qk_head_dim, c.rope_scaling))

    def absorbed_attention(self, q_nope_BxTxHxN, q_pe_BxTxHxR, ckv_BxSxC, k_pe_BxSxR, mask):
        """Attention over the latent itself (V2 §2.1.2): q_nope.k_nope = (q_nope W_UK^T).c_kv and
        sum_s p_s v_s = (sum_s p_s c_kv_s) W_UV, so no per-head K/V over the S slots -> [B, T, H, A]."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        N = c.qk_nope_head_dim
        w_CxHxNA = self.kv_up_kernel().astype(dt)
        w_uk_CxHxN, w_uv_CxHxA = w_CxHxNA[..., :N], w_CxHxNA[..., N:]
        q_lat_BxTxHxC = einsum_f32("bthn,chn->bthc", q_nope_BxTxHxN, w_uk_CxHxN).astype(dt)
        if resolve_attention_impl(c.attention_impl) == "blockwise":
            # The same scores as one kv head of width C + R, [q_lat, q_pe].[c_kv, k_pe], and the
            # latent as its value: online softmax over S blocks, no [T, S] logits per head.
            o_lat_BxTxHxC = blockwise_attention(
                jnp.concatenate([q_lat_BxTxHxC, q_pe_BxTxHxR.astype(dt)], axis=-1),
                jnp.concatenate([ckv_BxSxC, k_pe_BxSxR.astype(dt)], axis=-1)[:, :, None],
                ckv_BxSxC[:, :, None], scale=softmax_scale(c.qk_head_dim, c.rope_scaling), causal=False,
                mask=mask)
            return einsum_f32("bthc,cha->btha", o_lat_BxTxHxC, w_uv_CxHxA).astype(dt)
        logits_BxHxTxS = (
            einsum_f32("bthc,bsc->bhts", q_lat_BxTxHxC, ckv_BxSxC)
            + einsum_f32("bthr,bsr->bhts", q_pe_BxTxHxR, k_pe_BxSxR)
        ) * softmax_scale(c.qk_head_dim, c.rope_scaling)
        logits_BxHxTxS = jnp.where(mask, logits_BxHxTxS, -jnp.inf)
        probs = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(dt)
        # bf16 on XLA:CPU: this "bhts,bsc" dot is the one that crashed (DotThunk); see einsum_f32.
        o_lat_BxTxHxC = einsum_f32("bhts,bsc->bthc", probs, ckv_BxSxC).astype(dt)
        return einsum_f32("bthc,cha->btha", o_lat_BxTxHxC, w_uv_CxHxA).astype(dt)

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask, cache=None, index=None, absorbed=True):
        """Returns y [B, T, D], or (y, updated layer cache) when `cache` is given."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        N = c.qk_nope_head_dim
        q = self.project_q(x_BxTxD)
        q_nope, q_pe = q[..., :N], q[..., N:]
        ckv_BxTxC, k_pe_BxTxR = self.project_kv_latent(x_BxTxD)
        q_pe = apply_rope(q_pe, cos, sin, c.rope_interleave)
        k_pe_BxTxR = apply_rope(k_pe_BxTxR[:, :, None, :], cos, sin, c.rope_interleave)[:, :, 0]
        if cache is None:
            out = self.expanded_attention(q_nope, q_pe, ckv_BxTxC, k_pe_BxTxR, mask)
        else:
            # The cache stores k_pe after RoPE: a token's position never changes once written.
            cache = {"ckv": constrain(kv_cache.write(cache["ckv"], ckv_BxTxC, index), ("batch", "length", "kv_lora")),
                     "k_pe": constrain(kv_cache.write(cache["k_pe"], k_pe_BxTxR, index), ("batch", "length", None))}
            ckv_BxSxC, k_pe_BxSxR = cache["ckv"].astype(dt), cache["k_pe"].astype(dt)
            if isinstance(mask, PrefillMask):  # expanded: compute-bound here, absorbing costs C/N more FLOPs
                T = x_BxTxD.shape[1]
                out = self.expanded_attention(q_nope, q_pe, ckv_BxSxC[:, :T], k_pe_BxSxR[:, :T], mask.inner)
            else:
                attend = self.absorbed_attention if absorbed else self.expanded_attention
                out = attend(q_nope, q_pe, ckv_BxSxC, k_pe_BxSxR, mask)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = cast(matmul_2d(out, self.out_kernel().astype(dt), 2), dt)
        return y if cache is None else (y, cache)
