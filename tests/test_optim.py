"""Optimizer and schedules against hand-computed values and a NumPy AdamW."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule, param_labels


def _lr(cfg, step):
    return float(make_schedule(cfg)(step))


def test_cosine_schedule_hand_values():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert _lr(cfg, 0) == pytest.approx(0.1)  # the first update is not wasted at lr 0
    assert _lr(cfg, 5) == pytest.approx(0.6)
    assert _lr(cfg, 9) == pytest.approx(1.0)
    assert _lr(cfg, 10) == pytest.approx(1.0)
    # Halfway through the 100 decay steps the cosine factor is 0.5: 0.1 + 0.9 * 0.5.
    assert _lr(cfg, 60) == pytest.approx(0.55)
    assert _lr(cfg, 35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert _lr(cfg, 110) == pytest.approx(0.1)
    assert _lr(cfg, 500) == pytest.approx(0.1)


def test_multistep_schedule_deepseek_llm():
    # DeepSeek LLM §2.3: 2000 warmup steps, 31.6% after 80% of training, 10% after 90%.
    cfg = OptimizerConfig(learning_rate=4.2e-4, schedule="multistep", warmup_steps=2000, total_steps=10000)
    assert _lr(cfg, 999) == pytest.approx(2.1e-4)
    assert _lr(cfg, 2000) == pytest.approx(4.2e-4)
    assert _lr(cfg, 7999) == pytest.approx(4.2e-4)
    assert _lr(cfg, 8000) == pytest.approx(4.2e-4 * 0.316)
    assert _lr(cfg, 8999) == pytest.approx(4.2e-4 * 0.316)
    assert _lr(cfg, 9000) == pytest.approx(4.2e-5)
    assert _lr(cfg, 9999) == pytest.approx(4.2e-5)


# Decay progress p = 0.25 at step 85: linear p, cosine (1 - cos(pi p)) / 2, 1-sqrt sqrt(p).
@pytest.mark.parametrize("shape,quarter", [("linear", 0.25), ("cosine", 0.5 * (1 - math.cos(math.pi / 4))),
                                           ("1-sqrt", 0.5)])
def test_wsd_schedule(shape, quarter):
    cfg = OptimizerConfig(learning_rate=2.0, schedule="wsd", warmup_steps=4, total_steps=100,
                          wsd_decay_fraction=0.2, wsd_decay_shape=shape, min_lr_ratio=0.1)
    assert _lr(cfg, 1) == pytest.approx(1.0)
    assert _lr(cfg, 50) == pytest.approx(2.0)
    assert _lr(cfg, 80) == pytest.approx(2.0)  # decay starts at step 100 - 20
    assert _lr(cfg, 85) == pytest.approx(2.0 * (1 - 0.9 * quarter))
    assert _lr(cfg, 100) == pytest.approx(0.2)


def test_constant_schedule_without_warmup():
    cfg = OptimizerConfig(learning_rate=0.3, schedule="constant")
    assert _lr(cfg, 0) == pytest.approx(0.3) and _lr(cfg, 10**6) == pytest.approx(0.3)


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (5, 3))},
        "layers_0": {
            "attn_norm": {"scale": jnp.ones(3) * 1.5},
            "mlp": {"router": jax.random.normal(k[1], (3, 4)),
                    "e_score_correction_bias": jnp.array([0.1, -0.2, 0.3, 0.0])},
            "proj": {"kernel": jax.random.normal(k[2], (3, 3)), "bias": jnp.ones(3)},
        },
    }


def test_labels_and_decay_mask():
    cfg = OptimizerConfig(decay_embeddings=False)
    labels, mask = param_labels(_params(), cfg), decay_mask(_params(), cfg)
    assert labels["layers_0"]["mlp"]["e_score_correction_bias"] == "frozen"
    assert labels["layers_0"]["mlp"]["router"] == "train"
    assert mask["layers_0"]["mlp"]["router"] and mask["layers_0"]["proj"]["kernel"]
    assert not mask["layers_0"]["attn_norm"]["scale"] and not mask["layers_0"]["proj"]["bias"]
    assert not mask["embed"]["embedding"]
    assert decay_mask(_params(), OptimizerConfig())["embed"]["embedding"]


def test_zero_grad_decays_kernels_only_and_router_bias_frozen():
    lr, wd = 0.01, 0.1
    cfg = OptimizerConfig(learning_rate=lr, schedule="constant", weight_decay=wd)
    params = _params()
    opt = make_optimizer(cfg)
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = params
    for _ in range(3):
        updates, state = opt.update(zeros, state, new)
        new = optax.apply_updates(new, updates)
    l0, n0 = params["layers_0"], new["layers_0"]
    np.testing.assert_array_equal(n0["attn_norm"]["scale"], l0["attn_norm"]["scale"])
    np.testing.assert_array_equal(n0["proj"]["bias"], l0["proj"]["bias"])
    np.testing.assert_array_equal(n0["mlp"]["e_score_correction_bias"], l0["mlp"]["e_score_correction_bias"])
    np.testing.assert_allclose(n0["proj"]["kernel"], l0["proj"]["kernel"] * (1 - lr * wd) ** 3, rtol=1e-6)
    np.testing.assert_allclose(new["embed"]["embedding"], params["embed"]["embedding"] * (1 - lr * wd) ** 3,
                               rtol=1e-6)


def _numpy_adamw(params, grads_seq, lrs, cfg, decay, trainable):
    """AdamW (Loshchilov & Hutter, Alg. 2 with optax's lr-scaled decay) + global-norm clip."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items() if trainable[k]}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        scale = min(1.0, cfg.clip_norm / norm) if cfg.clip_norm else 1.0
        for k, gk in g.items():
            gk = gk * scale
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * gk * gk
            mhat, vhat = m[k] / (1 - cfg.b1**t), v[k] / (1 - cfg.b2**t)
            p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + cfg.eps) + (cfg.weight_decay * p[k] if decay[k] else 0.0))
    return p


def _flat_params():
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    return {"kernel": jax.random.normal(k[0], (4, 3)), "scale": jnp.linspace(0.5, 1.5, 3),
            "e_score_correction_bias": jnp.zeros(4)}


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_adamw_steps_match_numpy(clip_norm):
    cfg = OptimizerConfig(learning_rate=0.05, warmup_steps=2, total_steps=6, schedule="cosine",
                          weight_decay=0.1, clip_norm=clip_norm)
    params = _flat_params()
    rng = np.random.default_rng(0)
    # A large first gradient (clipped) then small ones (not clipped): Adam's update then
    # depends on the clip factor, so clipping is visible. The frozen leaf gets a huge
    # gradient that must neither move it nor enter the clipping norm.
    grads_seq = []
    for t, s in enumerate([30.0, 0.1, 0.2, 0.05]):
        g = {k: jnp.asarray(rng.normal(size=v.shape) * s, jnp.float32) for k, v in params.items()}
        g["e_score_correction_bias"] = jnp.full((4,), 1e3)
        grads_seq.append(g)
    opt = make_optimizer(cfg)
    state, p = opt.init(params), params
    for g in grads_seq:
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
    lrs = [float(make_schedule(cfg)(t)) for t in range(len(grads_seq))]
    ref = _numpy_adamw(params, grads_seq, lrs, cfg, decay={"kernel": True, "scale": False,
                                                            "e_score_correction_bias": False},
                       trainable={"kernel": True, "scale": True, "e_score_correction_bias": False})
    np.testing.assert_allclose(p["kernel"], ref["kernel"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(p["scale"], ref["scale"], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(p["e_score_correction_bias"], params["e_score_correction_bias"])


def test_clip_changes_updates_when_active():
    # Guards the test above: with this gradient sequence clipping really changes the result.
    params = _flat_params()
    g1 = jax.tree.map(lambda x: jnp.full_like(x, 30.0), params)
    g2 = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
    out = []
    for clip in (None, 1.0):
        opt = make_optimizer(OptimizerConfig(learning_rate=0.1, schedule="constant", clip_norm=clip))
        state, p = opt.init(params), params
        for g in (g1, g2):
            u, state = opt.update(g, state, p)
            p = optax.apply_updates(p, u)
        out.append(np.asarray(p["kernel"]))
    assert np.max(np.abs(out[0] - out[1])) > 1e-3


def test_config_from_dict_and_errors():
    cfg = OptimizerConfig.from_dict({"learning_rate": 1e-3, "multistep_boundaries": [0.5, 0.75],
                                     "multistep_factors": [0.5, 0.25], "schedule": "multistep"})
    assert cfg.multistep_boundaries == (0.5, 0.75)
    with pytest.raises(ValueError, match="unknown OptimizerConfig field"):
        OptimizerConfig.from_dict({"lr": 1.0})
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="linear")
    with pytest.raises(ValueError, match="multistep_factors"):
        OptimizerConfig(multistep_boundaries=(0.8,), multistep_factors=(0.3, 0.1))
