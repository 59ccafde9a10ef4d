"""Multi-Token Prediction depth >= 2 against a hand-unrolled chain (DeepSeek-V3 §2.2, eq. 21-23).

Oracle: from the same parameters, depth k gets h^{k-1} (the main model's final-normed state
for k = 1, then each depth's final-normed output), h'^k = M_k [RMSNorm(Emb(t_{i+k}));
RMSNorm(h^{k-1})], h^k = final_norm_k(TRM_k(h'^k)), logits = OutHead(h^k) with the shared head;
RMSNorm, the projection and the head in numpy, the Transformer block (tested on its own
against transformers) through `Block`.
"""
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.attention import attention_mask
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import rope_cos_sin
from deepseek_jax.model import Block, Transformer, init_params


def _rms(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def test_mtp_depth_two_is_the_papers_sequential_chain():
    c = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, intermediate_size=64, attention="mha",
                    num_attention_heads=4, num_mtp_layers=2, rms_norm_eps=1e-5)
    B, T = 2, 8
    params = init_params(c, jax.random.key(0), B, T)
    # Non-unit norm scales: with the initial ones, RMSNorm(final_norm(h)) = RMSNorm(h) and a
    # chain fed the pre-norm state would pass too.
    for k in range(c.num_mtp_layers):
        for name in ("enorm", "hnorm", "final_norm"):
            key = jax.random.key(10 * k + len(name))
            params[f"mtp_{k}"][name]["scale"] = jax.random.uniform(key, (c.hidden_size,), minval=0.2, maxval=2.0)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (B, T)).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        out = Transformer(c).apply({"params": params}, tokens)
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        cos, sin = rope_cos_sin(positions, c)
        mask = attention_mask(None, T)
        emb = np.asarray(params["embed"]["embedding"], np.float64)
        head = np.asarray(params["lm_head"]["kernel"], np.float64)
        prev, nxt = np.asarray(out.hidden, np.float64), tokens
        for k in range(c.num_mtp_layers):
            p = params[f"mtp_{k}"]
            nxt = np.concatenate([nxt[:, 1:], np.zeros_like(nxt[:, :1])], 1)  # t_{i+k+1} at position i
            e = _rms(emb[nxt], p["enorm"]["scale"], c.rms_norm_eps)
            h = _rms(prev, p["hnorm"]["scale"], c.rms_norm_eps)
            x = np.concatenate([e, h], -1) @ np.asarray(p["eh_proj"]["kernel"], np.float64)
            x, _ = Block(c, False).apply({"params": p["block"]}, jnp.asarray(x, jnp.float32), cos, sin, mask, None)
            prev = _rms(x, p["final_norm"]["scale"], c.rms_norm_eps)
            np.testing.assert_allclose(out.mtp_logits[k], prev @ head, rtol=1e-4, atol=1e-4, err_msg=f"depth {k + 1}")
