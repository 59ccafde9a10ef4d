"""Chunked output head + per-token objectives equal the full [B, T, V] computation: values and
gradients of `map_head`, and every loss (pretrain with MTP and z-loss, grpo, distill, dpo)
through the model's return_hidden path against the same loss on materialised logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import chunked_xent
from deepseek_jax import losses as L
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, init_params


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)


def _numpy_logp_entropy(h, w, targets):
    """Independent oracle: the log-softmax in float64 numpy."""
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp_all = logits - logz[..., None]
    return (np.take_along_axis(logp_all, np.asarray(targets)[..., None], -1)[..., 0],
            -(np.exp(logp_all) * logp_all).sum(-1))


def test_map_head_matches_full_values_and_gradients():
    r = np.random.default_rng(0)
    B, T, D, V = 3, 13, 8, 50  # T = 13 is not a multiple of the chunk: padding is sliced off
    h = jnp.asarray(r.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(r.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(r.integers(0, V, (B, T)))
    weights = jnp.asarray(r.random((B, T)), jnp.float32)

    def fn(logits, t):
        return L.token_logprobs(logits, t)[0], L.token_entropy(logits)

    def loss(h, w, chunk):
        logp, ent = chunked_xent.map_head(fn, h, w, targets, chunk=chunk)
        return jnp.sum(weights * (logp + 0.1 * ent)), (logp, ent)

    grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
    (v_full, (logp, ent)), g_full = grad(h, w, T)
    (v_chunk, (logp_c, ent_c)), g_chunk = grad(h, w, 4)
    np_logp, np_ent = _numpy_logp_entropy(h, w, targets)
    assert _rel(np_logp, logp) <= 1e-5 and _rel(np_ent, ent) <= 1e-5
    assert _rel(logp, logp_c) <= 1e-6 and _rel(ent, ent_c) <= 1e-6
    assert _rel(v_full, v_chunk) <= 1e-6
    for a, b in zip(g_full, g_chunk):
        assert _rel(a, b) <= 1e-5


def test_map_head_memory_is_one_chunk():
    """Temp bytes of the head + CE gradient do not grow with T once it is chunked."""
    D, V = 16, 4096

    def temp(T):
        def loss(h, w, t):
            return -jnp.sum(chunked_xent.map_head(lambda lg, t: L.token_logprobs(lg, t)[0], h, w, t, chunk=64))
        args = (jax.ShapeDtypeStruct((1, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
                jax.ShapeDtypeStruct((1, T), jnp.int32))
        return jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, big = temp(1024), temp(4096)
    full_logits_bytes = 4096 * V * 4
    assert big < full_logits_bytes / 4, (small, big)
    assert big <= 1.5 * small, (small, big)



def test_default_chunk_budgets_one_devices_rows():
    """A chunk holds <= CHUNK_ELEMENTS logits over the rows one device scans (analytic)."""
    from deepseek_jax import expert_parallel, sharding

    V3_VOCAB, BENCH_VOCAB = 129280, 32000
    assert chunked_xent.default_chunk(V3_VOCAB) == (1 << 26) // V3_VOCAB == 519
    # The bench model's 8 rows x 256 positions fit in one chunk: its head runs unchunked.
    assert chunked_xent.default_chunk(BENCH_VOCAB, rows=8) == 262
    assert chunked_xent.default_chunk(10**9) == 1
    mesh = sharding.make_mesh({"fsdp": 8})
    assert expert_parallel.batch_shards(16, mesh) == 8
    assert expert_parallel.batch_shards(12, mesh) == 1  # 8 devices do not divide 12 rows: run whole
    assert expert_parallel.batch_shards(16, None) == 1


def test_logp_logz_hit_against_numpy_with_ties():
    """log p, log Z against float64 numpy; hit = the target's logit is a maximum (ties count)."""
    logits = np.array([[[1.0, 3.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5], [-np.inf, 2.0, 1.0, 0.0]]], np.float32)
    targets = np.array([[2, 0, 3]])
    logp, logz, hit = L._logp_logz_hit(jnp.asarray(logits), jnp.asarray(targets))
    x = logits.astype(np.float64)
    want_logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    np.testing.assert_allclose(logz, want_logz, rtol=1e-6)
    np.testing.assert_allclose(logp, np.take_along_axis(x, targets[..., None], -1)[..., 0] - want_logz, rtol=1e-6)
    np.testing.assert_array_equal(hit, [[1.0, 1.0, 0.0]])


CONFIG = ModelConfig(vocab_size=48, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                     num_mtp_layers=1)


def _batch(name, B=4, T=10, V=48):
    r = np.random.default_rng(1)
    batch = {"tokens": jnp.asarray(r.integers(0, V, (B, T))), "targets": jnp.asarray(r.integers(0, V, (B, T))),
             "loss_mask": jnp.asarray(r.random((B, T)) < 0.8, jnp.float32),
             "segment_ids": jnp.asarray([[1] * 4 + [2] * 6] * B)}
    if name == "grpo":
        batch.update(old_logprobs=jnp.asarray(-3 + 0.1 * r.normal(size=(B, T)), jnp.float32),
                     ref_logprobs=jnp.asarray(-3 + 0.1 * r.normal(size=(B, T)), jnp.float32),
                     advantages=jnp.asarray(r.normal(size=(B,)), jnp.float32))
    if name == "distill":
        batch["teacher_logprobs"] = jax.nn.log_softmax(jnp.asarray(r.normal(size=(B, T, V)), jnp.float32))
    if name == "distill_topk":
        batch["teacher_topk_ids"] = jnp.asarray(np.argsort(r.random((B, T, V)), -1)[..., :5])
        batch["teacher_topk_logprobs"] = jnp.asarray(-1 - r.random((B, T, 5)), jnp.float32)
    if name == "dpo":
        batch["ref_logprobs"] = jnp.asarray(-3 + 0.1 * r.normal(size=(B, T)), jnp.float32)
    return batch


@pytest.fixture(scope="module")
def params():
    # Under jit (one compilation), once for every objective.
    return jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("name", ["pretrain", "grpo", "distill", "distill_topk", "dpo"])
def test_losses_chunked_equal_full_logits(name, params, monkeypatch):
    model = Transformer(CONFIG)
    batch = _batch(name)
    cfg = {"z_loss": 1e-2, "policy_temperature": 0.7, "temperature": 2.0, "distill_alpha": 0.5}
    cfg = {k: v for k, v in cfg.items() if k in {"z_loss"} or name != "pretrain"}
    loss_fn = L.get_loss(name.split("_")[0])
    run = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None, model=model, cfg=cfg), has_aux=True))
    # Chunked: 3 positions of the B = 4 rows per chunk (T = 10: four chunks, the last one padded).
    monkeypatch.setattr(chunked_xent, "CHUNK_ELEMENTS", 3 * 4 * CONFIG.vocab_size)
    (loss_c, metrics_c), grads_c = run(params)
    # Oracle: the same objective on materialised [B, T, V] logits (the model's own head).
    forward = L._forward
    monkeypatch.setattr(L, "_forward", lambda m, p, b: m.apply({"params": p}, b["tokens"],
                                                               positions=b.get("positions"),
                                                               segment_ids=b.get("segment_ids")))
    run = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None, model=model, cfg=cfg), has_aux=True))
    (loss_f, metrics_f), grads_f = run(params)
    assert forward is not L._forward
    assert _rel(loss_f, loss_c) <= 1e-5
    assert set(metrics_f) == set(metrics_c)
    for k in metrics_f:
        assert _rel(metrics_f[k], metrics_c[k]) <= 1e-5, k
    for a, b in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_c)):
        assert _rel(a, b) <= 1e-4


def test_map_head_under_a_mesh_gathers_the_head_once_and_reduces_its_gradient_once():
    """On an 8-way fsdp mesh (rows and the head's D dim split) with 8 chunks: values and
    gradients equal the single-device ones, and the compiled step moves the head weight once
    each way (hlo_stats counts a while body's collectives times its trip count); plain jit
    all-gathers it and all-reduces dW once per chunk."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    from deepseek_jax import hlo_stats, sharding

    B, T, D, V, n = 8, 64, 16, 256, 8
    r = np.random.default_rng(0)
    h = jnp.asarray(r.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(r.normal(size=(D, V)), jnp.float32)
    t = jnp.asarray(r.integers(0, V, (B, T)))

    def loss(h, w, t):
        return -jnp.sum(chunked_xent.map_head(lambda lg, t: L.token_logprobs(lg, t)[0], h, w, t, chunk=n) ** 2)

    want = jax.jit(jax.value_and_grad(loss, (0, 1)))(h, w, t)
    mesh = sharding.make_mesh({"fsdp": 8})
    rows, w_sh = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P("fsdp", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules()):
        step = jax.jit(jax.value_and_grad(loss, (0, 1)), in_shardings=(rows, w_sh, rows),
                       out_shardings=(None, (rows, w_sh)))
        got = step(h, w, t)
        text = step.lower(h, w, t).compile().as_text()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(b, a) <= 1e-5
    w_bytes = D * V * 4
    moved = [c for c in hlo_stats.analyze(text, 8)["collectives"] if c.bytes >= w_bytes]
    assert sorted((c.kind, c.count) for c in moved) in (
        [("all-gather", 1.0), ("all-reduce", 1.0)], [("all-gather", 1.0), ("reduce-scatter", 1.0)]), moved
