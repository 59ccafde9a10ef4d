"""Router replay (grpo.router_replay): the sampler records each token's experts, the training
forward routes the same tokens to them with gates recomputed from the current router logits.

Oracles: a numpy re-implementation of the gate formula on given experts (V3 sigmoid
renormalise-then-scale, V2 softmax renormalise-or-scale; DeepSeek's released routing); the
sampler's own recorded ids and temperature-1 log-probs. Non-vacuous: the training forward runs
with router biases that select other experts (the aux-loss-free update moves them between a
rollout and a later update); the bias only selects, so with the rollout's experts the forward is
the sampler's function again, and without replay it is not.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import layer_stack, losses, moe
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, init_params
from deepseek_jax.rl import advantages as adv_lib
from deepseek_jax.rl.sampler import Sampler

CFG = ModelConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                  kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=0, scoring_func="sigmoid",
                  norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True, n_shared_experts=1,
                  dtype="float32")
P, N, G = 6, 8, 2
PROMPTS = [[1, 2, 3, 4, 5], [3], [7, 1, 2]]


def _gates_numpy(logits, ids, score_func, norm_topk, K, scale):
    logits = np.asarray(logits, np.float64)
    if score_func == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    else:
        s = 1.0 / (1.0 + np.exp(-logits))
    w = np.take_along_axis(s, np.asarray(ids), axis=-1)
    if norm_topk and K > 1:
        w = w / w.sum(-1, keepdims=True)
        return w * (1.0 if score_func == "softmax" else scale)  # V2 renormalises OR scales; V3 both
    return w * scale


@pytest.mark.parametrize("score_func,norm,K", [("sigmoid", True, 2), ("softmax", True, 3), ("softmax", False, 2),
                                                ("sigmoid", True, 1)])
def test_forced_gates_match_numpy_and_routing(score_func, norm, K):
    c = CFG.replace(scoring_func=score_func, norm_topk_prob=norm, num_experts_per_tok=K)
    logits = jax.random.normal(jax.random.key(0), (10, 8)) * 2.0
    ids = np.stack([np.random.default_rng(i).permutation(8)[:K] for i in range(10)]).astype(np.int32)
    want = _gates_numpy(logits, ids, score_func, norm, K, 2.5)
    np.testing.assert_allclose(np.asarray(moe.forced_gates(logits, jnp.asarray(ids), c)), want, rtol=1e-5)
    # route(): rows of -1 route normally, the others take the forced experts and their gates.
    forced = np.where(np.arange(10)[:, None] % 2 == 0, ids, -1)
    bias = jax.random.normal(jax.random.key(1), (8,))
    w_ref, ids_ref = moe.route(logits, bias, c)
    w, got = moe.route(logits, bias, c, jnp.asarray(forced))
    even = np.arange(10) % 2 == 0
    np.testing.assert_array_equal(np.asarray(got)[even], ids[even])
    np.testing.assert_allclose(np.asarray(w)[even], want[even], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[~even], np.asarray(ids_ref)[~even])
    np.testing.assert_array_equal(np.asarray(w)[~even], np.asarray(w_ref)[~even])
    # Forcing the experts routing chose reproduces its gates (the same normalisation and scale).
    np.testing.assert_allclose(np.asarray(moe.route(logits, bias, c, ids_ref)[0]), np.asarray(w_ref), rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _rollout():
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(1))  # compiled: eager init costs more
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)
    sampler = Sampler(Transformer(CFG), P, N, record_experts=True)
    out = sampler.generate(params, PROMPTS, jax.random.key(2), temperature=1.0, num_samples=G, stop_tokens=[0])
    tokens, positions, segment_ids, completion = (np.asarray(a) for a in out.sequences())
    batch = adv_lib.build_grpo_batch(tokens, positions, segment_ids, completion, out.logprobs,
                                     np.linspace(-1, 1, len(tokens)))
    batch["ref_logprobs"] = batch["old_logprobs"]
    batch["expert_ids"] = np.asarray(out.expert_ids)[:, :-1]
    # Other router biases: large enough against sigmoid scores in (0, 1) to change the selection.
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: (jax.random.normal(jax.random.key(zlib.crc32(jax.tree_util.keystr(path).encode())), x.shape)
                         if "e_score_correction_bias" in jax.tree_util.keystr(path) else x), params)
    return params, moved, batch


@functools.lru_cache(maxsize=None)
def _compiled_forward(config, replay):
    """Log-probs and routed expert ids of the training forward, compiled (eager Flax costs more)."""
    model = Transformer(config)

    def forward(params, batch):
        kw = {"expert_ids": batch["expert_ids"]} if replay else {}
        out = model.apply({"params": layer_stack.to_layout(params, config)}, batch["tokens"],
                          positions=batch["positions"], segment_ids=batch["segment_ids"], **kw)
        return losses.token_logprobs(out.logits, batch["targets"])[0], out.moe.expert_ids

    return jax.jit(forward)


def _forward(config, params, batch, replay):
    keys = ("tokens", "positions", "segment_ids", "targets", "expert_ids")
    logp, ids = _compiled_forward(config, replay)(params, {k: jnp.asarray(batch[k]) for k in keys})
    return np.asarray(logp), np.moveaxis(np.asarray(ids), 0, 2)  # ids [B, T, L, K]


def test_sampler_records_what_the_training_forward_routes():
    params, _, batch = _rollout()
    recorded = batch["expert_ids"]
    seen = recorded[:, :, 0, 0] >= 0  # per token (all layers recorded together)
    mask = batch["loss_mask"] > 0
    # Every prompt token and every fed completion token is recorded; padding is not.
    lengths = batch["loss_mask"].sum(1)  # each row's last completion token is never fed: not recorded
    assert seen.sum() == (batch["segment_ids"] != 0).sum() - (lengths < N).sum()
    assert not seen[batch["segment_ids"] == 0].any()
    logp, ids = _forward(CFG, params, batch, replay=False)
    np.testing.assert_array_equal(ids[seen], recorded[seen])
    np.testing.assert_allclose(logp[mask], batch["old_logprobs"][mask], atol=2e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_replay_makes_the_training_forward_the_samplers(scan):
    _, moved, batch = _rollout()
    config = CFG.replace(scan_layers=scan)
    recorded, mask = batch["expert_ids"], batch["loss_mask"] > 0
    seen = recorded[:, :, 0, 0] >= 0  # per token (all layers recorded together)
    logp_free, ids_free = _forward(config, moved, batch, replay=False)
    assert (ids_free[seen] != recorded[seen]).any(axis=(-1, -2)).mean() > 0.2  # the moved biases route elsewhere
    assert np.abs(logp_free - batch["old_logprobs"])[mask].max() > 1e-3
    logp, ids = _forward(config, moved, batch, replay=True)
    np.testing.assert_array_equal(ids[seen], recorded[seen])
    assert np.abs(logp - batch["old_logprobs"])[mask].max() < 1e-5
    if scan:
        return
    # The GRPO loss forward replays from batch["expert_ids"]: ratio 1 against the sampler's log-probs.
    model = Transformer(config)
    _, m = jax.jit(lambda p, b: losses.grpo_loss(p, b, None, model=model))(
        moved, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(m["ratio"]), 1.0, atol=1e-5)
