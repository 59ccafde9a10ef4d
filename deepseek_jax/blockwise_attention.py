"""Blockwise (online-softmax, flash-style) attention in plain JAX: no [T, S] score matrix.

Dimension legend: B batch, T query time, S key time, H query heads, G kv heads (GQA),
J = H / G query heads per kv head, K query/key head dim, A value head dim (MLA: K = 192,
A = 128), nq / nk query / key blocks of bq / bk positions.

Forward (Dao et al. 2022, FlashAttention Alg. 1; Rabe & Staats 2021): queries in blocks of
bq, and for each, keys/values in blocks of bk with a float32 running max m, running sum l
and an unnormalised float32 output accumulator, rescaled by exp(m_old - m_new) whenever the
max grows. Key blocks entirely above the causal diagonal are skipped. The backward
(FlashAttention-2 Alg. 2) recomputes each score block from q, k, v and the saved per-row
log-sum-exp, so the only saved activations are O(T): memory grows linearly in T, not as T^2.

Masks are never materialised as [T, S] either: `causal` and per-position `segment_ids`
(packed documents) are evaluated per block. A dense boolean mask [B or 1, 1, T, S] (the KV
cache's prefill / decode masks) is also accepted and sliced per block.

`resolve_attention_impl(impl, platform)` is the one place that maps `ModelConfig.attention_impl`
("reference" | "blockwise" | "auto") to the implementation that runs.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from deepseek_jax.layers import cast, einsum_f32  # bf16 operands, f32 accumulation, also on XLA:CPU

ATTENTION_IMPLS = ("auto", "reference", "blockwise", "flash")  # flash: GPU only (gpu_kernels.py)
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def resolve_attention_impl(impl: str, platform: Optional[str] = None) -> str:
    """The implementation `impl` runs as on `platform` (default: jax's default backend).

    "auto" is "blockwise" everywhere for now (CPU and TPU run it well; a GPU flash kernel,
    when added, is selected here for platform "gpu"/"cuda").
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: use one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    from deepseek_jax import gpu_kernels  # the platform being built for (a CPU host lowering for cuda too)
    return "flash" if (platform or gpu_kernels.target_platform()) in ("gpu", "cuda") else "blockwise"


@flax.struct.dataclass
class CausalSegmentMask:
    """Causal attention within documents, described per position instead of per [T, S] pair.

    The lazy twin of `attention.attention_mask(segment_ids, T)`: position t attends to
    s <= t with segment_ids[s] == segment_ids[t] (all s <= t when segment_ids is None).
    """

    segment_ids: Optional[jax.Array] = None  # [B, T] int, or None (one document per row)

    def dense(self, T: int) -> jax.Array:
        """[B or 1, 1, T, T] boolean, as `attention.attention_mask` builds it (for the reference)."""
        causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
        if self.segment_ids is None:
            return causal_TxS[None, None]
        seg = self.segment_ids
        return (causal_TxS[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]


def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


class _Masker:
    """Builds the [B or 1, 1, 1, bq, bk] boolean mask of block (i, j) from its description."""

    def __init__(self, T, S, bq, bk, causal, seg_q, seg_k, dense):
        self.T, self.S, self.bq, self.bk, self.causal = T, S, bq, bk, causal
        self.seg_q, self.seg_k, self.dense = seg_q, seg_k, dense

    def __call__(self, i, j):
        q_idx = i * self.bq + jnp.arange(self.bq)
        k_idx = j * self.bk + jnp.arange(self.bk)
        ok = jnp.broadcast_to(k_idx[None, :] < self.S, (self.bq, self.bk))
        if self.causal:
            ok = ok & (k_idx[None, :] <= q_idx[:, None])
        ok = ok[None]
        if self.seg_q is not None:
            sq = jax.lax.dynamic_slice_in_dim(self.seg_q, i * self.bq, self.bq, axis=1)
            sk = jax.lax.dynamic_slice_in_dim(self.seg_k, j * self.bk, self.bk, axis=1)
            ok = ok & (sq[:, :, None] == sk[:, None, :])
        if self.dense is not None:  # [b, 1, Tp, Sp]
            d = jax.lax.dynamic_slice_in_dim(self.dense, i * self.bq, self.bq, axis=2)
            d = jax.lax.dynamic_slice_in_dim(d, j * self.bk, self.bk, axis=3)
            ok = ok & d[:, 0]
        return ok[:, None, None]  # broadcast over G, J

    def skip(self, i, j):
        """True when block (i, j) lies entirely above the causal diagonal (nothing to attend)."""
        if not self.causal:
            return jnp.bool_(False)
        return j * self.bk > i * self.bq + self.bq - 1


def _blocks(x, axis_len_block, n):
    """[B, T, G, ...] -> [n, B, b, G, ...] (blocks along time, leading for scan)."""
    B = x.shape[0]
    return jnp.moveaxis(x.reshape(B, n, axis_len_block, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, B, b, ...] -> [B, n * b, ...]."""
    n, B, b = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * b, *x.shape[3:])


def _scores(q_blk, k_blk, scale):
    # q [B, bq, G, J, K], k [B, bk, G, K] -> [B, G, J, bq, bk] float32
    return einsum_f32("bqgjk,bsgk->bgjqs", q_blk, k_blk) * scale


def _forward(q, k, v, seg_q, seg_k, dense, scale, causal, bq, bk, T, S):
    """Padded, grouped inputs -> (out [nq, B, bq, G, J, A] in v.dtype, lse [nq, B, G, J, bq] f32)."""
    nq, nk = q.shape[1] // bq, k.shape[1] // bk
    mask = _Masker(T, S, bq, bk, causal, seg_q, seg_k, dense)
    q_blocks, k_blocks, v_blocks = _blocks(q, bq, nq), _blocks(k, bk, nk), _blocks(v, bk, nk)
    B, G, J, A = q.shape[0], q.shape[2], q.shape[3], v.shape[-1]

    def q_step(_, xs):
        i, q_blk = xs

        def kv_step(carry, ys):
            j, k_blk, v_blk = ys

            def update(carry):
                m, l, acc = carry
                s = _scores(q_blk, k_blk, scale)
                s = jnp.where(mask(i, j), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing seen yet
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - m_safe) * jnp.isfinite(m)
                l = l * corr + p.sum(-1)
                pv = einsum_f32("bgjqs,bsga->bgjqa", p.astype(v_blk.dtype), v_blk)
                return m_new, l, acc * corr[..., None] + pv

            return jax.lax.cond(mask.skip(i, j), lambda c: c, update, carry), None

        init = (jnp.full((B, G, J, bq), -jnp.inf, jnp.float32), jnp.zeros((B, G, J, bq), jnp.float32),
                jnp.zeros((B, G, J, bq, A), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (jnp.arange(nk), k_blocks, v_blocks))
        l_safe = jnp.where(l > 0, l, 1.0)  # fully masked rows give 0, not nan
        out = (acc / l_safe[..., None]).astype(v.dtype)
        lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_safe), jnp.inf)
        return None, (jnp.einsum("bgjqa->bqgja", out), lse)

    _, (out, lse) = jax.lax.scan(q_step, None, (jnp.arange(nq), q_blocks))
    return out, lse


def _backward(q, k, v, seg_q, seg_k, dense, out, lse, d_out, scale, causal, bq, bk, T, S):
    """FlashAttention-2 backward: per key block, recompute every query block's scores."""
    nq, nk = q.shape[1] // bq, k.shape[1] // bk
    mask = _Masker(T, S, bq, bk, causal, seg_q, seg_k, dense)
    q_blocks, k_blocks, v_blocks = _blocks(q, bq, nq), _blocks(k, bk, nk), _blocks(v, bk, nk)
    do_blocks = _blocks(d_out, bq, nq)  # [nq, B, bq, G, J, A]
    # delta_i = sum_a dO_ia O_ia: the softmax Jacobian's row term, [nq, B, G, J, bq]
    delta = jnp.einsum("nbqgja,nbqgja->nbgjq", do_blocks.astype(jnp.float32), out.astype(jnp.float32))
    B, G, J, K, A = q.shape[0], q.shape[2], q.shape[3], q.shape[4], v.shape[-1]

    def k_step(dq_acc, xs):
        j, k_blk, v_blk = xs

        def q_step(carry, ys):
            i, q_blk, do_blk, lse_i, delta_i = ys

            def grads(carry):
                dk, dv = carry
                s = _scores(q_blk, k_blk, scale)
                p = jnp.where(mask(i, j), jnp.exp(s - lse_i[..., None]), 0.0)  # [B, G, J, bq, bk]
                dv = dv + einsum_f32("bgjqs,bqgja->bsga", p.astype(do_blk.dtype), do_blk)
                dp = einsum_f32("bqgja,bsga->bgjqs", do_blk, v_blk)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(q_blk.dtype)
                dk = dk + einsum_f32("bgjqs,bqgjk->bsgk", ds, q_blk)
                dq = einsum_f32("bgjqs,bsgk->bqgjk", ds, k_blk)
                return (dk, dv), dq

            def skip(carry):
                return carry, jnp.zeros((B, bq, G, J, K), jnp.float32)

            return jax.lax.cond(mask.skip(i, j), skip, grads, carry)

        init = (jnp.zeros((B, bk, G, K), jnp.float32), jnp.zeros((B, bk, G, A), jnp.float32))
        (dk, dv), dq = jax.lax.scan(q_step, init, (jnp.arange(nq), q_blocks, do_blocks, lse, delta))
        return dq_acc + dq, (dk, dv)

    dq0 = jnp.zeros((nq, B, bq, G, J, K), jnp.float32)
    dq, (dk, dv) = jax.lax.scan(k_step, dq0, (jnp.arange(nk), k_blocks, v_blocks))
    return _unblocks(dq), _unblocks(dk), _unblocks(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _flash(q, k, v, seg_q, seg_k, dense, scale, causal, bq, bk, T, S):
    return _flash_fwd(q, k, v, seg_q, seg_k, dense, scale, causal, bq, bk, T, S)[0]


def _flash_fwd(q, k, v, seg_q, seg_k, dense, scale, causal, bq, bk, T, S):
    out, lse = _forward(q, k, v, seg_q, seg_k, dense, scale, causal, bq, bk, T, S)
    return _unblocks(out), (q, k, v, seg_q, seg_k, dense, out, lse)


def _flash_bwd(scale, causal, bq, bk, T, S, res, d_out):
    q, k, v, seg_q, seg_k, dense, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg_q, seg_k, dense, out, lse, d_out.astype(v.dtype),
                           scale, causal, bq, bk, T, S)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _one_block(q, k, v, mask, scale):
    # Op for op the reference (attention.dot_product_attention: [B, H, T, S] scores, kv heads
    # repeated to H, jax.nn.softmax and its custom derivative); no custom_vjp, no loops. So
    # short sequences round as the reference does. This layout, not the grouped [B, G, J, T, S]
    # one, because XLA:CPU runs it ~1.4x faster (fwd + bwd at T = 256; the score passes dominate).
    B, T, G, J, K = q.shape
    k, v = (jnp.repeat(x, J, axis=2) for x in (k, v)) if J > 1 else (k, v)
    s = einsum_f32("bthk,bshk->bhts", q.reshape(B, T, G * J, K), k) * scale
    p = cast(jax.nn.softmax(jnp.where(mask[:, :, 0], s, -jnp.inf), axis=-1), v.dtype)
    return cast(einsum_f32("bhts,bsha->btha", p, v), v.dtype)


def blockwise_attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxA: jax.Array, *,
                        scale: float, causal: bool = True, segment_ids: Optional[jax.Array] = None,
                        mask: Optional[jax.Array] = None, block_q: Optional[int] = None,
                        block_k: Optional[int] = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v -> [B, T, H, A] in v's dtype, without a [T, S] matrix.

    `scale` is the full softmax scale (with YaRN's mscale^2 correction for MLA). G kv heads
    serve H / G query heads each (GQA; G = H for MHA and MLA's expanded path). Masking:
    `causal` (key index <= query index, T == S), `segment_ids` [B, T] (self-attention within
    a document; needs T == S), and/or a dense boolean `mask` [B or 1, 1, T, S]. Rows with
    nothing to attend to give 0 when there are several blocks (nan in one block, as the reference).
    """
    B, T, H, K = q_BxTxHxK.shape
    S, G, A = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2], v_BxSxGxA.shape[-1]
    if H % G:
        raise ValueError(f"blockwise_attention: {H} query heads are not a multiple of {G} kv heads")
    if (causal or segment_ids is not None) and T != S:
        raise ValueError(f"blockwise_attention: causal/segment masks need T == S, got T={T}, S={S}; "
                         "pass a dense `mask` for cached attention")
    bq, bk = min(block_q or DEFAULT_BLOCK_Q, T), min(block_k or DEFAULT_BLOCK_K, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    q = _pad_to(q_BxTxHxK, 1, Tp).reshape(B, Tp, G, H // G, K)
    k, v = _pad_to(k_BxSxGxK, 1, Sp), _pad_to(v_BxSxGxA, 1, Sp)
    seg_q = seg_k = None
    if segment_ids is not None:
        seg_q, seg_k = _pad_to(segment_ids, 1, Tp, -1), _pad_to(segment_ids, 1, Sp, -2)
    if mask is not None:
        mask = _pad_to(_pad_to(mask, 2, Tp, False), 3, Sp, False)
    if Tp == bq and Sp == bk:  # one block: the plain computation is already O(bq * bk)
        out = _one_block(q, k, v, _Masker(T, S, bq, bk, causal, seg_q, seg_k, mask)(0, 0), float(scale))
    else:
        out = _flash(q, k, v, seg_q, seg_k, mask, float(scale), bool(causal), bq, bk, T, S)
    return out.reshape(B, Tp, H, A)[:, :T]
