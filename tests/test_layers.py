"""RoPE layouts and YaRN against NumPy implementations written from the papers.

RoPE: RoFormer (arXiv:2104.09864) eq. 34 rotates pairs (x_2i, x_2i+1) by m * theta_i,
theta_i = base^(-2i/d); Llama checkpoints pair (x_i, x_i+d/2) instead ("rotate_half").
YaRN (arXiv:2309.00071 §3.2, "NTK-by-parts"): r_i = L / lambda_i rotations of frequency i in
the original context L; frequencies with r > beta_fast keep theta_i, those with r < beta_slow
become theta_i / s, a linear ramp in between (the released code ramps over the frequency
index between floor/ceil of the indices where r = beta_fast and r = beta_slow); attention
temperature sqrt(1/t) = 0.1 ln s + 1 (eq. 22), generalised by DeepSeek to 0.1 m ln s + 1.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ModelConfig, RopeScaling
from deepseek_jax.layers import (apply_rope, matmul_2d, rope_cos_sin, rope_inv_freq, softmax_scale,
                                 yarn_mscale)

V3_YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0)
V2_YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                      mscale=0.707, mscale_all_dim=0.707)


def np_theta(dim, base):
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def np_rotate_pairs(x, angles):
    """RoFormer eq. 34 on interleaved pairs, in place: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    c, s = np.cos(angles), np.sin(angles)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    return out


def np_rotate_half_layout(x, angles):
    """Llama: x * cos + rotate_half(x) * sin with cos/sin repeated over both halves."""
    half = x.shape[-1] // 2
    c, s = np.concatenate([np.cos(angles)] * 2, -1), np.concatenate([np.sin(angles)] * 2, -1)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * c + rotated * s


def np_yarn(dim, base, rs: RopeScaling):
    """inv_freq, ramp window (lo, hi) and r_i per frequency, from the paper's definitions."""
    theta = np_theta(dim, base)
    L = rs.original_max_position_embeddings
    r = L * theta / (2 * np.pi)  # rotations in the original context = L / wavelength

    def index_where(n):  # solve r_i = n for i: L base^(-2i/dim) / (2 pi) = n
        return dim * np.log(L / (2 * np.pi * n)) / (2 * np.log(base))

    lo, hi = max(math.floor(index_where(rs.beta_fast)), 0), min(math.ceil(index_where(rs.beta_slow)), dim - 1)
    keep = 1 - np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0, 1)  # 1 = keep theta (extrapolate)
    return keep * theta + (1 - keep) * theta / rs.factor, (lo, hi), r


def _config(interleave, dim=16, scaling=None):
    return ModelConfig(attention="mha", hidden_size=4 * dim, num_attention_heads=4,
                       rope_interleave=interleave, rope_scaling=scaling)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_numpy(interleave):
    rng = np.random.default_rng(0)
    B, T, H, R = 2, 11, 3, 16
    x = rng.standard_normal((B, T, H, R)).astype(np.float32)
    pos = np.stack([np.arange(T), np.arange(T) + 100]).astype(np.int32)
    cos, sin = rope_cos_sin(jnp.asarray(pos), _config(interleave, R))
    ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleave))
    angles = pos[:, :, None, None] * np_theta(R, 10000.0)
    if interleave:
        ref = np_rotate_pairs(x.astype(np.float64), angles)
        # The rotated pairs come back in half layout (evens, then odds): q and k are permuted alike.
        ref = np.concatenate([ref[..., 0::2], ref[..., 1::2]], -1)
    else:
        ref = np_rotate_half_layout(x.astype(np.float64), angles)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_interleaved_scores_equal_the_unpermuted_rotation():
    """q.k after our interleaved RoPE equals q.k of RoFormer's in-place rotation, and depends
    only on the relative position."""
    rng = np.random.default_rng(1)
    R = 16
    q, k = rng.standard_normal((2, 1, 1, 1, R)).astype(np.float32)
    c = _config(True, R)

    def score(m, n):
        cq, sq = rope_cos_sin(jnp.full((1, 1), m, jnp.int32), c)
        ck, sk = rope_cos_sin(jnp.full((1, 1), n, jnp.int32), c)
        return float((np.asarray(apply_rope(jnp.asarray(q), cq, sq, True))
                      * np.asarray(apply_rope(jnp.asarray(k), ck, sk, True))).sum())

    theta = np_theta(R, 10000.0)
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    ref = (np_rotate_pairs(q64, 7 * theta) * np_rotate_pairs(k64, 3 * theta)).sum()
    assert score(7, 3) == pytest.approx(ref, rel=1e-5)
    assert score(107, 103) == pytest.approx(ref, rel=1e-4)


def test_plain_inv_freq():
    inv_freq, factor = rope_inv_freq(64, 10000.0, None)
    np.testing.assert_allclose(np.asarray(inv_freq), np_theta(64, 10000.0), rtol=1e-6)
    assert factor == 1.0


@pytest.mark.parametrize("rs", [V3_YARN, V2_YARN,
                                RopeScaling(factor=4.0, original_max_position_embeddings=32)])
def test_yarn_inv_freq_matches_numpy(rs):
    dim, base = 64, 10000.0
    ours, _ = rope_inv_freq(dim, base, rs)
    ref, (lo, hi), r = np_yarn(dim, base, rs)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6)
    # Outside the ramp, the paper's gamma(r) is exactly 0 or 1.
    ours = np.asarray(ours, np.float64)
    theta = np_theta(dim, base)
    np.testing.assert_allclose(ours[r > rs.beta_fast], theta[r > rs.beta_fast], rtol=1e-6)
    np.testing.assert_allclose(ours[r < rs.beta_slow], theta[r < rs.beta_slow] / rs.factor, rtol=1e-6)
    if rs is V3_YARN:  # DeepSeek-V3 (rope dim 64, L 4096): the ramp spans frequency indices 10..23
        assert (lo, hi) == (10, 23)


def test_yarn_mscale_and_softmax_scale():
    # REFERENCES.md: softmax scale x mscale(factor, mscale_all_dim)^2, mscale(s, m) = 0.1 m ln s + 1.
    m_v3 = 0.1 * 1.0 * np.log(40.0) + 1
    m_v2 = 0.1 * 0.707 * np.log(40.0) + 1
    assert yarn_mscale(40.0, 1.0) == pytest.approx(m_v3, rel=1e-12)
    assert softmax_scale(192, V3_YARN) == pytest.approx(m_v3 ** 2 / np.sqrt(192), rel=1e-12)
    assert softmax_scale(192, V2_YARN) == pytest.approx(m_v2 ** 2 / np.sqrt(192), rel=1e-12)
    assert softmax_scale(192, None) == pytest.approx(1 / np.sqrt(192), rel=1e-12)
    assert yarn_mscale(1.0, 1.0) == 1.0  # no extension, no correction
    # DeepSeek: mscale == mscale_all_dim, so cos/sin are not rescaled (their ratio is 1) ...
    cos, sin = rope_cos_sin(jnp.zeros((1, 1), jnp.int32), _config(True, 16, V2_YARN))
    np.testing.assert_allclose(np.asarray(cos), 1.0, rtol=1e-6)
    # ... plain YaRN (no mscales) puts the temperature sqrt(1/t) = 0.1 ln s + 1 on cos and sin.
    plain = RopeScaling(factor=4.0, original_max_position_embeddings=32, mscale=0.0, mscale_all_dim=0.0)
    cos, _ = rope_cos_sin(jnp.zeros((1, 1), jnp.int32), _config(True, 16, plain))
    np.testing.assert_allclose(np.asarray(cos), 0.1 * np.log(4.0) + 1, rtol=1e-6)
    assert softmax_scale(16, plain) == pytest.approx(0.25)


def test_tied_embeddings_share_the_table_with_the_head():
    """tie_word_embeddings: no lm_head, logits = final hidden @ embedding^T."""
    from deepseek_jax.model import Transformer, init_params

    c = ModelConfig(attention="mha", tie_word_embeddings=True)
    params = init_params(c, jax.random.key(0))
    assert "lm_head" not in params
    out = Transformer(c).apply({"params": params}, jnp.arange(6, dtype=jnp.int32)[None])
    want = np.asarray(out.hidden) @ np.asarray(params["embed"]["embedding"]).T
    np.testing.assert_allclose(np.asarray(out.logits), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_in,x_shape,k_shape", [(1, (2, 3, 5), (5, 4, 6)), (2, (2, 3, 4, 5), (4, 5, 7))])
def test_matmul_2d_equals_numpy_tensordot(n_in, x_shape, k_shape):
    """The flattened GEMM every Dense layer runs contracts the same dims as a tensordot."""
    x = np.random.default_rng(0).normal(size=x_shape).astype(np.float32)
    k = np.random.default_rng(1).normal(size=k_shape).astype(np.float32)
    want = np.tensordot(x.astype(np.float64), k.astype(np.float64), axes=n_in)
    got = matmul_2d(jnp.asarray(x), jnp.asarray(k), n_in)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
