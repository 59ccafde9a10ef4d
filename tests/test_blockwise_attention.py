"""Blockwise (online-softmax) attention against the dense reference: forward, gradients, masks,
GQA and MLA head shapes, bf16, memory growth, and the model-level `attention_impl` switch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.attention import attention_mask, dot_product_attention
from deepseek_jax.blockwise_attention import CausalSegmentMask, blockwise_attention, resolve_attention_impl
from deepseek_jax.config import ModelConfig, RopeScaling
from deepseek_jax.layers import softmax_scale
from deepseek_jax.model import Transformer, init_params


def _inputs(B, T, H, G, K, A, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
    seg = np.sort(r.integers(1, 4, size=(B, T)), axis=1)  # packed documents
    return mk(B, T, H, K), mk(B, T, G, K), mk(B, T, G, A), jnp.asarray(seg), mk(B, T, H, A)


def _reference(q, k, v, mask, scale):
    J = q.shape[2] // k.shape[2]
    return dot_product_attention(q, jnp.repeat(k, J, 2), jnp.repeat(v, J, 2), mask, scale)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)


# (H, G, K, A): GQA with head dim 16; MLA's q/k 24 (nope 16 + rope 8) vs v 16 with YaRN's scale.
SHAPES = {"gqa": (4, 2, 16, 16, softmax_scale(16, None)),
          "mla": (4, 4, 24, 16, softmax_scale(24, RopeScaling(factor=40.0, mscale_all_dim=1.0)))}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_blockwise_matches_reference_f32(shape):
    H, G, K, A, scale = SHAPES[shape]
    T = 44  # not a multiple of the blocks: padding is masked out
    q, k, v, seg, w = _inputs(2, T, H, G, K, A)
    mask = attention_mask(seg, T)
    ref = lambda q, k, v: _reference(q, k, v, mask, scale)
    blk = lambda q, k, v: blockwise_attention(q, k, v, scale=scale, segment_ids=seg, block_q=16, block_k=8)
    assert _rel(ref(q, k, v), blk(q, k, v)) <= 1e-5
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), (0, 1, 2))(q, k, v)
    g_blk = jax.grad(lambda *a: jnp.sum(blk(*a) * w), (0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_blk):
        assert _rel(a, b) <= 1e-5


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_block_is_the_reference(shape, dtype):
    """T within one block (the default block is 512): the plain computation, op for op the
    reference, so forward and gradients agree to rounding in float32 and in bf16."""
    H, G, K, A, scale = SHAPES[shape]
    T = 20
    q, k, v, seg, w = _inputs(2, T, H, G, K, A, dtype=dtype, seed=4)
    mask = attention_mask(seg, T)
    ref = lambda q, k, v: _reference(q, k, v, mask, scale)
    blk = lambda q, k, v: blockwise_attention(q, k, v, scale=scale, segment_ids=seg)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    out = jax.jit(blk)(q, k, v)
    assert out.dtype == dtype and _rel(jax.jit(ref)(q, k, v), out) <= tol
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a).astype(jnp.float32) * w), (0, 1, 2)))(q, k, v)
    g_blk = jax.jit(jax.grad(lambda *a: jnp.sum(blk(*a).astype(jnp.float32) * w), (0, 1, 2)))(q, k, v)
    for a, b in zip(g_ref, g_blk):
        assert _rel(a, b) <= tol


def test_blockwise_causal_only_and_dense_mask():
    H, G, K, A, scale = SHAPES["gqa"]
    T = 32
    q, k, v, _, w = _inputs(1, T, H, G, K, A, seed=1)
    causal = attention_mask(None, T)
    out = blockwise_attention(q, k, v, scale=scale, block_q=8, block_k=8)
    assert _rel(_reference(q, k, v, causal, scale), out) <= 1e-5
    # A dense non-causal mask (as the KV cache's prefill masks): random allowed pairs, every row >= 1.
    dense = np.random.default_rng(2).random((1, 1, T, T)) < 0.3
    dense[..., np.arange(T), np.arange(T)] = True
    dense = jnp.asarray(dense)
    blk = lambda q, k, v: blockwise_attention(q, k, v, scale=scale, causal=False, mask=dense, block_q=8, block_k=16)
    ref = lambda q, k, v: _reference(q, k, v, dense, scale)
    assert _rel(ref(q, k, v), blk(q, k, v)) <= 1e-5
    for a, b in zip(jax.grad(lambda *x: jnp.sum(ref(*x) * w), (0, 1, 2))(q, k, v),
                    jax.grad(lambda *x: jnp.sum(blk(*x) * w), (0, 1, 2))(q, k, v)):
        assert _rel(a, b) <= 1e-5


def test_blockwise_bf16_within_bf16_tolerance():
    H, G, K, A, scale = SHAPES["mla"]
    T = 48
    q, k, v, seg, w = _inputs(2, T, H, G, K, A, dtype=jnp.bfloat16, seed=3)
    mask = attention_mask(seg, T)
    f32 = lambda x: x.astype(jnp.float32)
    exact = lambda q, k, v: _reference(f32(q), f32(k), f32(v), mask, scale)  # float32 oracle
    blk = lambda q, k, v: blockwise_attention(q, k, v, scale=scale, segment_ids=seg, block_q=16, block_k=16)
    # Under jit: one compilation each instead of every op of the block loops dispatched alone.
    out = jax.jit(blk)(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert _rel(jax.jit(exact)(q, k, v), out) <= 2e-2
    g_exact = jax.jit(jax.grad(lambda *a: jnp.sum(exact(*a) * f32(w)), (0, 1, 2)))(q, k, v)
    g_blk = jax.jit(jax.grad(lambda *a: jnp.sum(f32(blk(*a)) * f32(w)), (0, 1, 2)))(q, k, v)
    for a, b in zip(g_exact, g_blk):
        assert _rel(a, b) <= 3e-2


def test_blockwise_memory_grows_linearly():
    """Temp bytes of forward + backward: ~2x per doubling of T (the reference grows ~4x)."""
    H, G, K, A = 2, 2, 16, 16

    def temp(fn, T):
        shapes = [jax.ShapeDtypeStruct((1, T, H, K), jnp.float32), jax.ShapeDtypeStruct((1, T, G, K), jnp.float32),
                  jax.ShapeDtypeStruct((1, T, G, A), jnp.float32)]
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, T)), (0, 1, 2)))
        return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    blk = lambda q, k, v, T: blockwise_attention(q, k, v, scale=0.25, block_q=128, block_k=128)
    ref = lambda q, k, v, T: dot_product_attention(q, k, v, attention_mask(None, T), 0.25)
    b = [temp(blk, T) for T in (1024, 2048, 4096)]
    r = [temp(ref, T) for T in (1024, 2048)]
    print("blockwise temp bytes", b, "reference", r)
    assert b[1] / b[0] <= 2.2 and b[2] / b[1] <= 2.2, b
    assert r[1] / r[0] >= 2.3 and r[1] > 4 * b[1], (r, b)  # the oracle is superlinear: the check can fail


def test_model_attention_impl_switch():
    """A packed batch through the whole model: blockwise == reference logits and gradients."""
    c = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    params = init_params(c, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
    assert isinstance(attention_mask(seg, 12, "blockwise"), CausalSegmentMask)
    assert resolve_attention_impl("auto", "cpu") == "blockwise"

    def loss(p, impl):
        out = Transformer(c.replace(attention_impl=impl)).apply({"params": p}, tokens, segment_ids=seg)
        return jnp.mean(out.logits ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l_ref, g_ref), (l_blk, g_blk) = (grad(params, i) for i in ("reference", "blockwise"))
    assert _rel(l_ref, l_blk) <= 1e-5
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_blk)):
        assert _rel(a, b) <= 1e-4


def test_absorbed_decode_blockwise_matches_reference(monkeypatch):
    """Prefill + decode through the latent cache: the absorbed path chunked over S (blockwise)
    gives the reference's logits (several S blocks: the cache is longer than one block)."""
    from deepseek_jax import kv_cache
    import deepseek_jax.blockwise_attention as bw

    c = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    params = init_params(c, jax.random.key(1))
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 9)))
    valid = jnp.asarray([[0, 0] + [1] * 7, [1] * 9])  # left padding in row 0

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl):
        model = Transformer(c.replace(attention_impl=impl))
        cache = kv_cache.init_cache(c, batch=2, max_len=24)
        out, cache = model.apply({"params": params}, prompt, segment_ids=valid, cache=cache)
        step, _ = model.apply({"params": params}, prompt[:, -1:], cache=cache)
        return out.logits[:, 2:], step.logits

    ref = run("reference")
    monkeypatch.setattr(bw, "DEFAULT_BLOCK_Q", 4)
    monkeypatch.setattr(bw, "DEFAULT_BLOCK_K", 8)
    calls = []
    monkeypatch.setattr(bw, "_flash", lambda *a: calls.append(1) or bw._flash_fwd(*a)[0])
    blk = run("blockwise")
    assert calls  # the multi-block path ran
    for a, b in zip(ref, blk):
        assert _rel(a, b) <= 1e-5
