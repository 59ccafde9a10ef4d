"""Scanned layers (ModelConfig.scan_layers): the same model as the per-layer Python loop.

Oracles: the unrolled Transformer (scan_layers=False) with the same weights moved through
`layer_stack.stack_layers` (forward logits, MTP logits, MoE statistics, gradients, KV-cache
decode), a numpy re-statement of the V3 bias update, and the per-layer parameter counts.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import hf, inspect as ds_inspect, kv_cache, layer_stack, moe
from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.model import Transformer, init_params
from deepseek_jax.sharding import abstract_params

# V3 in miniature: a dense prefix, MoE layers with a selection bias, an MTP module, remat.
CFG = ModelConfig(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, scoring_func="sigmoid", group_score="top2_sum", router_bias=True, num_mtp_layers=1,
                  remat="full", attention_impl="reference")
SCAN = CFG.replace(scan_layers=True)
B, T = 2, 8


def _jit_init(config, key):
    # Under jit: one compilation instead of the forward's ops dispatched one by one.
    return jax.jit(init_params, static_argnums=0)(config, key)


@pytest.fixture(scope="module")
def weights():
    params = _jit_init(CFG, jax.random.key(0))
    # Non-zero biases, so selection depends on them (and on which layer's bias is used).
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), x.shape) * 0.1
        if jax.tree_util.keystr(p).endswith("['e_score_correction_bias']") else x, params)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
    return params, layer_stack.stack_layers(params, SCAN), tokens


def test_layout_has_two_stacks_with_a_layers_axis(weights):
    per_layer, stacked, _ = weights
    assert sorted(stacked) == ["dense_layers", "embed", "final_norm", "lm_head", "moe_layers", "mtp_0"]
    boxed = abstract_params(Transformer(SCAN))
    spec = nn.get_partition_spec(boxed)
    assert spec["moe_layers"]["mlp"]["gate_proj"][0] == "layers"
    assert spec["dense_layers"]["attn_norm"]["scale"][0] == "layers"
    # The model's own init has the stacked structure and shapes.
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed))
    assert shapes == jax.tree.map(lambda x: x.shape, stacked)
    assert stacked["moe_layers"]["mlp"]["e_score_correction_bias"].shape == (2, 4)
    back = layer_stack.unstack_layers(stacked, SCAN)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, per_layer))


def test_forward_stats_and_gradients_equal_the_loop(weights):
    per_layer, stacked, tokens = weights

    @functools.partial(jax.jit, static_argnums=0)
    def run(config, params):
        def loss(p):
            out = Transformer(config).apply({"params": p}, tokens)
            return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits ** 2) + jnp.mean(out.moe.probs ** 2), out
        return jax.value_and_grad(loss, has_aux=True)(params)

    (l_ref, out_ref), g_ref = run(CFG, per_layer)
    (l_scan, out_scan), g_scan = run(SCAN, stacked)
    np.testing.assert_allclose(out_scan.logits, out_ref.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_scan.mtp_logits, out_ref.mtp_logits, rtol=1e-5, atol=1e-6)
    for f in ("counts", "probs", "router_z", "tokens", "dropped", "group_tokens", "seq_balance"):
        np.testing.assert_allclose(getattr(out_scan.moe, f), getattr(out_ref.moe, f), rtol=1e-5, atol=1e-6,
                                   err_msg=f)
    assert out_scan.moe.counts.shape[0] == 3  # two MoE layers, then the MTP block
    np.testing.assert_allclose(l_scan, l_ref, rtol=1e-6)
    g_ref = layer_stack.stack_layers(g_ref, SCAN)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_scan, g_ref)


def test_decode_equals_the_loop(weights):
    per_layer, stacked, tokens = weights

    def decode(config, params):
        apply, logits = jax.jit(Transformer(config).apply), []  # compiled once for prefill, once per step
        cache = kv_cache.init_cache(config, batch=B, max_len=T + 2)
        out, cache = apply({"params": params}, tokens[:, :5], cache=cache)
        logits.append(out.logits)
        for t in range(5, 7):
            out, cache = apply({"params": params}, tokens[:, t:t + 1], cache=cache)
            logits.append(out.logits)
        return jnp.concatenate(logits, axis=1), cache

    ref, cache_ref = decode(CFG, per_layer)
    got, cache_scan = decode(SCAN, stacked)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert len(cache_scan.layers) == CFG.num_hidden_layers  # the cache stays per layer
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), cache_scan.layers,
                 cache_ref.layers)


def test_bias_update_on_stacked_biases(weights):
    per_layer, stacked, _ = weights
    counts_LxE = jnp.array([[4.0, 0, 0, 0], [0, 1.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # moe 1, moe 2, mtp
    rate = 0.5
    new = moe.update_router_biases(stacked, counts_LxE, rate)
    old_LxE = np.concatenate([stacked["moe_layers"]["mlp"]["e_score_correction_bias"],
                              stacked["mtp_0"]["block"]["mlp"]["e_score_correction_bias"][None]])
    c = np.asarray(counts_LxE)
    want = old_LxE + rate * np.sign(c.mean(1, keepdims=True) - c)  # V3 §2.1.2, per layer
    np.testing.assert_allclose(new["moe_layers"]["mlp"]["e_score_correction_bias"], want[:2], rtol=1e-6)
    np.testing.assert_allclose(new["mtp_0"]["block"]["mlp"]["e_score_correction_bias"], want[2], rtol=1e-6)
    # The same update through the per-layer layout.
    ref = layer_stack.stack_layers(moe.update_router_biases(per_layer, counts_LxE, rate), SCAN)
    np.testing.assert_allclose(new["moe_layers"]["mlp"]["e_score_correction_bias"],
                               ref["moe_layers"]["mlp"]["e_score_correction_bias"])
    with pytest.raises(ValueError, match="4 layers but the params hold 3"):
        moe.update_router_biases(stacked, jnp.zeros((4, 4)), rate)


def test_param_counts_unchanged():
    assert ds_inspect.param_counts(SCAN) == ds_inspect.param_counts(CFG)


def test_hf_round_trip_through_the_per_layer_layout(weights, tmp_path):
    per_layer, stacked, tokens = weights
    hf.save_pretrained(Transformer(SCAN), stacked, str(tmp_path))
    _, loaded_ref = hf.from_pretrained(str(tmp_path))  # per-layer model reads the scanned export
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), loaded_ref, per_layer)
    model, loaded = hf.from_pretrained(str(tmp_path), scan_layers=True)
    assert model.config.scan_layers and layer_stack.is_stacked(loaded)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, stacked)


def test_interleaved_layers_fall_back_to_the_loop():
    cfg = ModelConfig(num_hidden_layers=4, n_routed_experts=4, moe_layer_freq=2, scan_layers=True)
    assert layer_stack.stacks(cfg) is None
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))  # the layout only: no compilation
    assert sorted(k for k in params if k.startswith("layers_")) == [f"layers_{i}" for i in range(4)]
    assert layer_stack.stack_layers(params, cfg) is params


def test_scan_layers_is_validated():
    with pytest.raises(ConfigError, match="model.scan_layers='yes'"):
        ModelConfig(scan_layers="yes")
