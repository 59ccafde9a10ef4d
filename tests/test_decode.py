"""Cached prefill + decode against the full forward (issue 6 acceptance).

Oracle: `Transformer.__call__` without a cache (itself checked against `transformers` in
test_hf_parity.py) evaluated on the whole sequence; decode must give the same logits at
every position (<= 1e-4, float32) for MLA absorbed (q-LoRA on / off, YaRN past the original
context) and MHA/GQA, and absorbed must equal the naive expanded decode. Cache bytes are
checked against the paper's formula and DeepSeek-V3's published 70,272 bytes per token.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import kv_cache
from deepseek_jax.config import ModelConfig, RopeScaling
from deepseek_jax.model import Transformer, init_params

TOL = 1e-4
B, T, PREFILL = 2, 12, 5

CONFIGS = {
    # q-LoRA + V3-style MoE (sigmoid, groups, bias) + an MTP module the decode path must skip.
    "mla_qlora_moe": ModelConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                 v_head_dim=12, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                 moe_intermediate_size=16, first_k_dense_replace=1, scoring_func="sigmoid",
                                 n_group=2, topk_group=1, group_score="top2_sum", norm_topk_prob=True,
                                 routed_scaling_factor=2.5, router_bias=True, num_mtp_layers=1),
    # No q-LoRA, YaRN with original context 4 so positions up to 11 are well past it.
    "mla_yarn": ModelConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                            rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=4,
                                                     mscale=0.707, mscale_all_dim=0.707)),
    "mha": ModelConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, attention="mha", num_attention_heads=4,
                       rope_interleave=False),
    "gqa": ModelConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, attention="mha", num_attention_heads=4,
                       num_key_value_heads=2, rope_interleave=False),
}


@functools.partial(jax.jit, static_argnums=0)
def _params(config):
    # Larger than the 0.02 init so that logits vary by O(1) and a wrong mask or position shows.
    params = init_params(config, jax.random.key(0))
    return jax.tree.map(lambda p: p * 6.0 if p.ndim >= 2 else p, params)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    config = CONFIGS[request.param]
    model = Transformer(config)
    params = _params(config)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    full = jax.jit(model.apply)({"params": params}, tokens).logits

    @jax.jit
    def run(tokens, absorbed):
        cache = kv_cache.init_cache(config, B, T)
        out, cache = model.apply({"params": params}, tokens[:, :PREFILL], cache=cache, absorbed=absorbed)

        def step(cache, token_B):  # one token per call, as in generation
            out, cache = model.apply({"params": params}, token_B[:, None], cache=cache, absorbed=absorbed)
            return cache, out.logits[:, 0]

        cache, logits_TxBxV = jax.lax.scan(step, cache, tokens[:, PREFILL:].T)
        return jnp.concatenate([out.logits, logits_TxBxV.transpose(1, 0, 2)], axis=1), cache

    run = jax.jit(run.__wrapped__, static_argnames="absorbed")
    decode = lambda absorbed: run(tokens, absorbed=absorbed)
    return request.param, config, full, decode


def test_decode_equals_full_forward(case):
    name, config, full, decode = case
    assert float(jnp.abs(full).max()) > 1.0, "logits too flat for the check to mean anything"
    dec, cache = decode(absorbed=True)
    err = float(jnp.abs(dec - full).max())
    assert err <= TOL, f"{name}: cached decode differs from the full forward by {err}"
    assert int(cache.index) == T and bool(cache.valid.all())


def test_absorbed_equals_naive(case):
    name, config, full, decode = case
    if config.attention != "mla":
        pytest.skip("absorption is an MLA choice")
    absorbed, cache_a = decode(absorbed=True)
    naive, cache_n = decode(absorbed=False)
    assert float(jnp.abs(absorbed - naive).max()) <= TOL
    assert float(jnp.abs(naive - full).max()) <= TOL
    for la, ln in zip(cache_a.layers, cache_n.layers):  # both write the same latent cache
        for k in la:
            np.testing.assert_allclose(la[k], ln[k], atol=1e-5)


def test_left_padded_prompt_equals_prompt_alone():
    """The prompt shifted right by 3 padding slots: same logits at its tokens, and after it.
    (MoE rows under padding are covered end to end by test_sampler.py.)"""
    config = CONFIGS["mla_yarn"]
    model, params = Transformer(config), _params(config)
    tokens = jax.random.randint(jax.random.key(2), (1, 6), 0, config.vocab_size)
    nxt = jnp.array([[5]])

    @jax.jit
    def run(params):
        padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
        seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
        out, cache = model.apply({"params": params}, padded, segment_ids=seg,
                                 cache=kv_cache.init_cache(config, 1, 10))
        dec, _ = model.apply({"params": params}, nxt, cache=cache)
        full = model.apply({"params": params}, jnp.concatenate([tokens, nxt], axis=1)).logits
        return out.logits[:, 3:], dec.logits, full, cache.lengths

    prefill, dec, full, lengths = run(params)
    assert float(jnp.abs(prefill - full[:, :-1]).max()) <= TOL
    assert float(jnp.abs(dec - full[:, -1:]).max()) <= TOL
    assert list(np.asarray(lengths)) == [6]


@pytest.mark.parametrize("name", ["mla_qlora_moe", "gqa"])
def test_prefill_kernel_equals_attention_over_the_cache_slots(name):
    """Transformer(prefill=True) (the tokens attend among themselves, with attention_impl's
    kernel) against the cache path's [B, 1, T, S] mask over every slot: the same logits at the
    prompt tokens, the same cache at its valid slots, the same next decode step."""
    base = CONFIGS[name]
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jax.random.randint(jax.random.key(3), (1, 6), 1, 48)], 1)
    tokens = jnp.concatenate([padded, jax.random.randint(jax.random.key(4), (1, 9), 1, 48)])  # row 0 left-padded
    seg = jnp.array([[0] * 3 + [1] * 6, [1] * 9])
    nxt = jnp.array([[5], [7]])

    def run(config, prefill):
        model = Transformer(config)
        params = _params(base)
        out, cache = model.apply({"params": params}, tokens, segment_ids=seg, prefill=prefill,
                                 cache=kv_cache.init_cache(config, 2, 12))
        dec, _ = model.apply({"params": params}, nxt, cache=cache)
        return out.logits, dec.logits, cache

    real = np.asarray(seg, bool)
    want_logits, want_dec, want_cache = jax.jit(run, static_argnums=(0, 1))(base, False)
    for impl in ("reference", "blockwise"):
        logits, dec, cache = jax.jit(run, static_argnums=(0, 1))(dataclasses.replace(base, attention_impl=impl), True)
        np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(want_logits)[real], atol=TOL, err_msg=impl)
        np.testing.assert_allclose(dec, want_dec, atol=TOL, err_msg=impl)
        np.testing.assert_array_equal(cache.valid, want_cache.valid)
        for got, want in zip(cache.layers, want_cache.layers):
            for k in want:
                np.testing.assert_allclose(np.asarray(got[k])[:, :9][real], np.asarray(want[k])[:, :9][real],
                                           atol=1e-5, err_msg=(impl, k))
    with pytest.raises(ValueError, match="prefill=True needs an empty cache"):
        Transformer(base).apply({"params": _params(base)}, nxt, prefill=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_bytes_per_token_formula(name):
    config = CONFIGS[name]
    L = config.num_hidden_layers
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        if config.attention == "mla":
            expected = (config.kv_lora_rank + config.qk_rope_head_dim) * L * nbytes
        else:
            expected = 2 * config.kv_heads * config.mha_head_dim * L * nbytes
        cache = kv_cache.init_cache(config, 3, 7, dtype)
        assert kv_cache.cache_nbytes(cache) == expected * 3 * 7
        assert kv_cache.bytes_per_token(config, dtype) == expected


def test_deepseek_v3_cache_bytes_match_paper():
    """V3 in bf16: (512 + 64) x 61 x 2 = 70,272 bytes per token (REFERENCES.md), by shape only."""
    v3 = ModelConfig(vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                     q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, dtype="bfloat16")
    shapes = jax.eval_shape(lambda: kv_cache.init_cache(v3, 1, 1))
    assert kv_cache.cache_nbytes(shapes) == 70_272 == kv_cache.bytes_per_token(v3, "bfloat16")


def test_cache_overflow_is_an_error():
    config = CONFIGS["mha"]
    model, params = Transformer(config), _params(config)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), cache=kv_cache.init_cache(config, 1, 3))
