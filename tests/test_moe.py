"""MoE layer: dispatch backends x meshes against the single-device dense reference, the CPU
grouped matmul's HLO, capacity drop accounting, Pallas routing, and load balancing.

Oracles: `expert_ffn_dense` on one device (every expert on every token, a plain [N, E]
combine), numpy counts, and the closed-form statistics of hand-made loads.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import losses as losses_lib
from deepseek_jax import moe, sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.outputs import MoEStats

RTOL = 1e-5
# V3-style routing (sigmoid, selection bias, top-2-sum groups, renormalised, scaled), small.
CFG = ModelConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                  n_shared_experts=1, scoring_func="sigmoid", n_group=8, topk_group=4, group_score="top2_sum",
                  norm_topk_prob=True, routed_scaling_factor=2.5, router_bias=True, capacity_factor=16.0)
B, T = 8, 4
MESHES = {"8data": dict(data=8), "2data_4expert": dict(data=2, expert=4),
          "2fsdp_4expert": dict(fsdp=2, expert=4), "8expert": dict(data=1, expert=8)}


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(1), (B, T, CFG.hidden_size))
    params = nn.meta.unbox(moe.MoE(CFG).init(jax.random.key(0), x)["params"])
    # A non-zero bias, so selection differs from the un-biased scores (it must only select).
    params["e_score_correction_bias"] = 0.1 * jax.random.normal(jax.random.key(3), (CFG.n_routed_experts,))
    r = jax.random.normal(jax.random.key(2), x.shape)
    return x, params, r


def _loss_and_grad(cfg, r):
    def f(p, x):
        y, stats = moe.MoE(cfg).apply({"params": p}, x)
        return jnp.sum(y * r), (y, stats)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@pytest.fixture(scope="module")
def reference(setup):
    x, params, r = setup
    (_, (y, stats)), grads = _loss_and_grad(CFG.replace(moe_dispatch="dense"), r)(params, x)
    return y, grads, stats


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("dispatch", ["dropless", "capacity", "dense"])
def test_backend_and_mesh_match_single_device_dense(setup, reference, mesh_name, dispatch):
    x, params, r = setup
    y_ref, g_ref, stats_ref = reference
    mesh = sharding.make_mesh(MESHES[mesh_name])
    fn = _loss_and_grad(CFG.replace(moe_dispatch=dispatch), r)
    with jax.set_mesh(mesh):
        (_, (y, stats)), grads = fn(params, jax.device_put(x, sharding.batch_sharding(mesh, 3)))
        if dispatch == "dropless" and mesh.shape["expert"] > 1:  # really expert-parallel
            assert "all-to-all" in fn.lower(params, x).compile().as_text()
    assert _rel(y, y_ref) <= RTOL
    for (path, g), g0 in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(g_ref)):
        assert _rel(g, g0) <= RTOL, jax.tree_util.keystr(path)
    assert int(stats["dropped"]) == 0
    np.testing.assert_array_equal(stats["counts"], stats_ref["counts"])


def _random_routing(key, N, E, K, D=16, F=8, skew=False):
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (N, D))
    ws = [0.3 * jax.random.normal(ks[1], (E, D, F)), 0.3 * jax.random.normal(ks[2], (E, D, F)),
          0.3 * jax.random.normal(ks[3], (E, F, D))]
    logits = jax.random.normal(ks[4], (N, E))
    if skew:  # every token picks the same K experts: the worst case for a capacity bound
        logits = logits + 100.0 * (jnp.arange(E) < K)
    weights, ids = jax.lax.top_k(jax.nn.softmax(logits), K)
    return x, ws, weights, ids.astype(jnp.int32)


@pytest.mark.parametrize("impl", ["tiled", "ragged"])
@pytest.mark.parametrize("skew", [False, True])
def test_grouped_matmul_is_exact_and_dropless(impl, skew):
    x, ws, weights, ids = _random_routing(jax.random.key(5), 48, 16, 3, skew=skew)
    loss = lambda fn: lambda ws, x: jnp.sum(jnp.sin(fn(x, *ws, weights, ids)[0]))
    dropless = lambda *a: moe.expert_ffn_dropless(*a, impl=impl)
    y, y_ref = jax.jit(dropless)(x, *ws, weights, ids)[0], jax.jit(moe.expert_ffn_dense)(x, *ws, weights, ids)[0]
    assert _rel(y, y_ref) <= RTOL
    g = jax.jit(jax.grad(loss(dropless), argnums=(0, 1)))(ws, x)
    g_ref = jax.jit(jax.grad(loss(moe.expert_ffn_dense), argnums=(0, 1)))(ws, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _rel(a, b) <= RTOL


def test_tiled_grouped_matmul_bf16_matches_float32_dense():
    """bf16 operands (the CPU path runs the tiles, and the weight gradient's pre-transposed
    tiles, on the bf16 kernels): within bf16 rounding of the float32 dense oracle evaluated
    on the same bf16-rounded inputs."""
    x, ws, weights, ids = _random_routing(jax.random.key(7), 48, 16, 3, D=32, F=16)
    x, ws = x.astype(jnp.bfloat16), [w.astype(jnp.bfloat16) for w in ws]
    loss = lambda fn: lambda ws, x: jnp.sum(jnp.sin(fn(x, *ws, weights, ids)[0].astype(jnp.float32)))
    tiled = lambda *a: moe.expert_ffn_dropless(*a, impl="tiled")
    dense32 = lambda x, *rest: moe.expert_ffn_dense(x.astype(jnp.float32), *(w.astype(jnp.float32) for w in rest[:3]),
                                                    *rest[3:])
    y = jax.jit(tiled)(x, *ws, weights, ids)[0]
    assert y.dtype == jnp.bfloat16
    assert _rel(y, jax.jit(dense32)(x, *ws, weights, ids)[0]) <= 1e-2
    g = jax.jit(jax.grad(loss(tiled), argnums=(0, 1)))(ws, x)
    g_ref = jax.jit(jax.grad(loss(dense32), argnums=(0, 1)))(ws, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert a.dtype == jnp.bfloat16 and _rel(a, b) <= 2e-2


def _dot_output_sizes(hlo_text: str) -> list[int]:
    """Element counts of every dot's result in compiled HLO text."""
    sizes = []
    for m in re.finditer(r"= f32\[([\d,]*)\][^=]*? dot\(", hlo_text):
        dims = [int(d) for d in m.group(1).split(",") if d]
        sizes.append(int(np.prod(dims)) if dims else 1)
    return sizes


def test_cpu_dropless_hlo_has_no_masked_dense_dot():
    N, E, K, D, F = 64, 32, 2, 16, 8
    x, ws, weights, ids = _random_routing(jax.random.key(6), N, E, K, D, F)

    def hlo(impl):
        f = lambda ws, x: jnp.sum(moe.expert_ffn_dropless(x, *ws, weights, ids, impl=impl)[0])
        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(ws, x).compile().as_text()

    R = moe.dropless_tile_rows(N * K, E)
    # Largest honest dot: one tile against one expert, or one expert's weight gradient.
    bound = max(R * max(D, F), D * F)
    assert moe.grouped_impl() == "tiled"
    sizes = _dot_output_sizes(hlo("tiled"))
    assert sizes and max(sizes) <= bound, (sizes, bound)
    # Positive control: XLA:CPU's ragged_dot lowering has dots spanning all tokens x experts.
    assert max(_dot_output_sizes(hlo("ragged"))) >= N * K * F


def test_capacity_counts_drops_exactly():
    N, E, K = 40, 8, 2
    x, ws, weights, ids = _random_routing(jax.random.key(7), N, E, K)
    per_expert = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
    capacity_ffn = jax.jit(moe.expert_ffn_capacity, static_argnums=6)
    for capacity in (2, 9):
        _, dropped = capacity_ffn(x, *ws, weights, ids, capacity)
        assert int(dropped) == int(np.maximum(per_expert - capacity, 0).sum()) > 0
    out, dropped = capacity_ffn(x, *ws, weights, ids, N)  # enough: nothing dropped
    assert int(dropped) == 0 and _rel(out, jax.jit(moe.expert_ffn_dense)(x, *ws, weights, ids)[0]) <= RTOL


def test_capacity_drops_on_expert_mesh_are_summed_per_source_device(setup):
    x, params, _ = setup
    cfg = CFG.replace(moe_dispatch="capacity", capacity_policy="gshard", capacity_factor=0.5)
    mesh = sharding.make_mesh(MESHES["2data_4expert"])
    with jax.set_mesh(mesh):
        _, stats = jax.jit(moe.MoE(cfg).apply)({"params": params}, x)
    # GShard capacity per source device: C = ceil(n K / E * factor) for its n = N / 8 tokens.
    _, ids = moe.route(x.reshape(B * T, -1) @ params["router"], params["e_score_correction_bias"], cfg)
    n = B * T // 8
    C = moe.expert_capacity(n, cfg)
    expected = sum(np.maximum(np.bincount(np.asarray(ids[d * n:(d + 1) * n]).reshape(-1),
                                          minlength=cfg.n_routed_experts) - C, 0).sum() for d in range(8))
    assert expected > 0 and int(stats["dropped"]) == expected


def test_pallas_routing_layer_matches_xla(setup):
    x, params, r = setup
    (_, (y, stats)), g = _loss_and_grad(CFG.replace(routing_impl="pallas"), r)(params, x)
    (_, (y0, stats0)), g0 = _loss_and_grad(CFG.replace(routing_impl="xla"), r)(params, x)
    np.testing.assert_array_equal(stats["counts"], stats0["counts"])
    assert _rel(y, y0) <= RTOL
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        assert _rel(a, b) <= RTOL


def test_group_tokens_counts_each_token_once_per_group(setup):
    x, params, _ = setup
    _, stats = moe.MoE(CFG).apply({"params": params}, x)
    _, ids = moe.route(x.reshape(B * T, -1) @ params["router"], params["e_score_correction_bias"], CFG)
    per_group = CFG.n_routed_experts // CFG.n_group
    groups = np.asarray(ids).reshape(B, T, -1) // per_group
    expected = np.zeros((B, CFG.n_group))
    for b in range(B):
        for t in range(T):
            for g in set(groups[b, t].tolist()):
                expected[b, g] += 1
    np.testing.assert_array_equal(stats["group_tokens"], expected)
    assert np.all(expected.sum(-1) <= T * CFG.topk_group)  # the group limit holds


def test_update_router_biases_walks_layers_in_moe_stats_order():
    zeros = jnp.zeros((4,))
    params = {"embed": {"embedding": jnp.ones((3, 2))},
              "layers_10": {"mlp": {"e_score_correction_bias": zeros}},
              "layers_2": {"mlp": {"e_score_correction_bias": zeros + 1.0}},
              "layers_0": {"mlp": {"gate_proj": jnp.ones((2, 2))}},
              "mtp_0": {"block": {"mlp": {"e_score_correction_bias": zeros}}}}
    counts = jnp.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [1.0, 1.0, 1.0, 1.0]])
    new = moe.update_router_biases(params, counts, 0.5)
    # Row 0 -> layers_2, row 1 -> layers_10 (numeric, not string order), row 2 -> mtp_0.
    np.testing.assert_allclose(new["layers_2"]["mlp"]["e_score_correction_bias"], [0.5, 1.5, 1.5, 1.5])
    np.testing.assert_allclose(new["layers_10"]["mlp"]["e_score_correction_bias"], [0.5, -0.5, 0.5, 0.5])
    np.testing.assert_allclose(new["mtp_0"]["block"]["mlp"]["e_score_correction_bias"], zeros)
    assert new["layers_0"] is params["layers_0"] or np.all(new["layers_0"]["mlp"]["gate_proj"] == 1)
    with pytest.raises(ValueError, match="3 layers but the params hold"):
        moe.update_router_biases({"layers_2": params["layers_2"]}, counts, 0.5)


def _bias_loop(params, x, mesh, steps, rate):
    """`steps` rounds of: route the batch, update the bias from its global counts."""
    cfg = CFG.replace(n_shared_experts=0)

    @jax.jit
    def step(tree):
        _, stats = moe.MoE(cfg).apply({"params": tree["layers_1"]["mlp"]}, x)
        counts_LxE = stats["counts"].sum(0)[None]
        return moe.update_router_biases(tree, counts_LxE, rate), counts_LxE[0]

    tree, loads = {"layers_1": {"mlp": params}}, []
    with jax.set_mesh(mesh) if mesh is not None else _null():
        for _ in range(steps):
            tree, load = step(tree)
            loads.append(np.asarray(load))
    return tree["layers_1"]["mlp"]["e_score_correction_bias"], np.stack(loads)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_bias_update_balances_a_skewed_router_identically_on_every_mesh(setup):
    x, params, _ = setup
    params = dict(params, e_score_correction_bias=jnp.zeros((CFG.n_routed_experts,)))
    # Skew: a router column pattern that strongly prefers the first experts for every token.
    params["router"] = params["router"] + 0.6 * jnp.linspace(1.0, -1.0, CFG.n_routed_experts)[None] \
        * jnp.sign(x.reshape(B * T, -1).mean(0))[:, None]
    bias, loads = _bias_loop(params, x, None, 40, 0.02)
    cv = loads.std(-1) / loads.mean(-1)
    assert cv[0] > 1.0 and cv[-5:].mean() < 0.5 * cv[0], cv
    stats = moe.load_stats(MoEStats(counts=jnp.asarray(loads[:, None]), probs=None, router_z=None, tokens=None,
                                    dropped=jnp.zeros(len(loads))))
    np.testing.assert_allclose(stats["cv"], cv, rtol=1e-5)
    bias_ep, loads_ep = _bias_loop(params, x, sharding.make_mesh(MESHES["2data_4expert"]), 40, 0.02)
    np.testing.assert_array_equal(loads_ep, loads)
    np.testing.assert_array_equal(bias_ep, bias)


def test_load_stats_closed_form():
    counts = jnp.array([[[3.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])  # [L=2, B=1, E=4]
    stats = moe.load_stats(MoEStats(counts=counts, probs=None, router_z=None, tokens=None,
                                    dropped=jnp.array([1, 0])))
    np.testing.assert_allclose(stats["max_over_mean"], [3.0, 1.0])
    np.testing.assert_allclose(stats["min_over_mean"], [0.0, 1.0])
    np.testing.assert_allclose(stats["cv"], [np.std([3, 1, 0, 0]) / 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(stats["drop_rate"], [0.25, 0.0])


# ----- routing semantics of DeepSeek's released code (numpy oracle) ------------------------------

def _deepseek_gate(logits, bias, *, version, K, norm_topk_prob, scale, n_group, topk_group):
    """MoEGate.forward of DeepSeek's released modeling_deepseek.py, V2 or V3, as dense [N, E] weights.

    V2: softmax, group score = max (group_limited_greedy; greedy when n_group = 1), then
    `if top_k > 1 and norm_topk_prob: normalise  else: * routed_scaling_factor`.
    V3: sigmoid, selection on s + bias with top-2-sum groups, weights from s, normalise when
    top_k > 1 and norm_topk_prob, then always * routed_scaling_factor.
    """
    N, E = logits.shape
    if version == 2:
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        choice = s
        group_score = choice.reshape(N, n_group, -1).max(-1)
    else:
        s = 1.0 / (1.0 + np.exp(-logits))
        choice = s + bias
        group_score = np.sort(choice.reshape(N, n_group, -1), -1)[..., -2:].sum(-1)
    out = np.zeros((N, E))
    for t in range(N):
        groups = np.argsort(-group_score[t], kind="stable")[:topk_group]
        allowed = np.repeat(np.isin(np.arange(n_group), groups), E // n_group)
        idx = np.argsort(-np.where(allowed, choice[t], -np.inf), kind="stable")[:K]
        w = s[t, idx]
        if version == 2:
            w = w / (w.sum() + 1e-20) if (K > 1 and norm_topk_prob) else w * scale
        else:
            w = w / (w.sum() + 1e-20) if (K > 1 and norm_topk_prob) else w
            w = w * scale
        out[t, idx] = w
    return out


@pytest.mark.parametrize("version, K, norm", [(2, 3, True), (2, 3, False), (2, 1, True), (3, 3, True), (3, 1, True)])
def test_routing_weights_follow_deepseeks_released_gate(version, K, norm):
    E, G, M, N = 16, 4, 2, 24
    cfg = ModelConfig(n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=M,
                      scoring_func="softmax" if version == 2 else "sigmoid",
                      group_score="max" if version == 2 else "top2_sum", norm_topk_prob=norm,
                      routed_scaling_factor=16.0 if version == 2 else 2.5, router_bias=version == 3)
    logits = np.asarray(jax.random.normal(jax.random.key(11), (N, E)), np.float64)
    bias = np.asarray(0.3 * jax.random.normal(jax.random.key(12), (E,)), np.float64) if version == 3 else None
    want = _deepseek_gate(logits, bias, version=version, K=K, norm_topk_prob=norm,
                          scale=cfg.routed_scaling_factor, n_group=G, topk_group=M)
    for impl in ("xla", "pallas"):
        w, ids = moe.route(jnp.asarray(logits, jnp.float32), None if bias is None else jnp.asarray(bias, jnp.float32),
                           cfg.replace(routing_impl=impl))
        got = np.zeros((N, E))
        np.put_along_axis(got, np.asarray(ids), np.asarray(w), axis=-1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=impl)


# ----- DeepSeek-V2 token dropping (§2.2.4) -----------------------------------------------------

def _affinity_keep_oracle(priority_NxK, ids_NxK, groups: int, devices: int, E: int, factor: float):
    """Per expert group (consecutive token shards) and device: keep the ceil(n K factor) copies of
    highest priority (ties: lower copy index) and every protected one (priority >= 2), never a
    negative (padding) one."""
    N, K = ids_NxK.shape
    n = N // (groups * devices)  # tokens per source device
    budget = int(np.ceil(n * K * factor))
    keep = np.zeros((N, K), bool)
    per_group = N // groups
    for g in range(groups):
        pri = priority_NxK[g * per_group:(g + 1) * per_group].reshape(-1)
        dev = ids_NxK[g * per_group:(g + 1) * per_group].reshape(-1) // (E // devices)
        k = np.zeros(pri.shape, bool)
        for d in range(devices):
            mine = np.flatnonzero(dev == d)
            ranked = mine[np.lexsort((mine, -pri[mine]))]
            k[ranked[:budget]] = True
        keep[g * per_group:(g + 1) * per_group] = ((k | (pri >= 2.0)) & (pri >= 0)).reshape(-1, K)
    return keep


@pytest.mark.parametrize("mesh_name, groups, devices", [(None, 1, 1), ("8data", 8, 1), ("2data_4expert", 2, 4)])
def test_affinity_dropping_drops_the_lowest_affinity_copies_on_each_device(mesh_name, groups, devices):
    from deepseek_jax import expert_parallel

    N, E, K, factor = 64, 16, 4, 0.6
    x, ws, weights, ids = _random_routing(jax.random.key(21), N, E, K)
    # A skew toward the first experts (device 0 overflows) and distinct affinities.
    logits = jax.random.normal(jax.random.key(22), (N, E)) + 1.5 * (jnp.arange(E) < 6)
    weights, ids = jax.lax.top_k(jax.nn.softmax(logits), K)
    ids = ids.astype(jnp.int32)
    priority = np.array(weights)
    priority[8:16] += 2.0  # a protected row's tokens are kept first
    priority[40:44] = -1.0  # padding tokens: dropped, not counted
    if devices == 1 and groups == 1:
        factor = 0.5  # one device holding every expert: only a factor < 1 drops
    cfg = ModelConfig(hidden_size=16, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=8,
                      moe_dispatch="capacity", capacity_policy="affinity", capacity_factor=factor)
    keep = _affinity_keep_oracle(priority, np.asarray(ids), groups, devices, E, factor)
    want_dropped = int((~keep & (priority >= 0)).sum())
    assert want_dropped > 0 and keep[8:16].all()
    fn = jax.jit(lambda x, ws, w, i, p: expert_parallel.routed_experts(x, *ws, w, i, cfg, priority_NxK=p))
    mesh = sharding.make_mesh(MESHES[mesh_name]) if mesh_name else None
    with jax.set_mesh(mesh) if mesh is not None else _null():
        y, dropped = fn(x, ws, weights, ids, jnp.asarray(priority))
    # Oracle: the dense reference with the dropped copies' gate weights set to zero.
    y_ref, _ = moe.expert_ffn_dense(x, *ws, jnp.where(jnp.asarray(keep), weights, 0.0), ids)
    assert int(dropped) == want_dropped
    assert _rel(y, y_ref) <= RTOL


def test_moe_layer_logs_the_oracle_drop_rate():
    """The layer's priorities are its affinity scores (V2: softmax over all experts), rows 3
    and 7 protected (fraction 0.25), padding never counted; drop rate = dropped / routed."""
    from deepseek_jax import metrics as metrics_lib

    cfg = ModelConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, moe_intermediate_size=16,
                      n_group=4, topk_group=2, routed_scaling_factor=16.0, moe_dispatch="capacity",
                      capacity_policy="affinity", capacity_factor=0.7, capacity_protected_fraction=0.25)
    x = jax.random.normal(jax.random.key(31), (B, T, cfg.hidden_size))
    params = nn.meta.unbox(moe.MoE(cfg).init(jax.random.key(0), x)["params"])
    valid = np.ones((B, T), bool)
    valid[5, 2:] = False
    mesh = sharding.make_mesh(MESHES["2data_4expert"])
    with jax.set_mesh(mesh):
        _, stats = jax.jit(moe.MoE(cfg).apply)({"params": params}, x, jnp.asarray(valid))
    logits = np.asarray(x, np.float64).reshape(B * T, -1) @ np.asarray(params["router"], np.float64)
    _, ids = moe.route(jnp.asarray(logits, jnp.float32), None, cfg)
    ids = np.asarray(ids)
    s = np.exp(logits - logits.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    priority = np.take_along_axis(s, ids, -1) + 2.0 * np.isin(np.arange(B * T) // T, [3, 7])[:, None]
    priority = np.where(valid.reshape(-1, 1), priority, -1.0)
    keep = _affinity_keep_oracle(priority, ids, 2, 4, cfg.n_routed_experts, cfg.capacity_factor)
    want = int((~keep & (priority >= 0)).sum())
    assert want > 0 and int(stats["dropped"]) == want
    routed = valid.sum() * cfg.num_experts_per_tok
    assert float(np.asarray(stats["counts"]).sum()) == routed
    moe_stats = MoEStats(counts=stats["counts"][None], probs=None, router_z=None, tokens=None,
                         dropped=stats["dropped"][None])
    np.testing.assert_allclose(moe.load_stats(moe_stats)["drop_rate"], [want / routed], rtol=1e-6)
    logged = metrics_lib.expert_load_stats(np.asarray(stats["counts"]).sum(0)[None], dropped=float(stats["dropped"]))
    assert logged["moe/drop_rate"] == pytest.approx(want / routed, rel=1e-6)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_routing_stats_probs_and_router_z_loss_match_numpy(setup, scoring):
    """MoEStats.probs = per-row sums of the affinities normalised over all experts (V3 eq. 19-20:
    s'_{i,t} = s_{i,t} / sum_j s_{j,t}), router_z = per-row sums of logsumexp(logits)^2, and
    losses.router_z_loss / expert_balance_loss on them, against numpy from the router weights."""
    from deepseek_jax import losses

    x, params, _ = setup
    cfg = CFG.replace(scoring_func=scoring, group_score="max") if scoring == "softmax" else CFG
    valid = np.ones((B, T), bool)
    valid[2, 1:] = False
    _, stats = moe.MoE(cfg).apply({"params": params}, x, jnp.asarray(valid))
    logits = (np.asarray(x, np.float64).reshape(B * T, -1) @ np.asarray(params["router"], np.float64))
    if scoring == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        s = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (s / s.sum(-1, keepdims=True)) * valid.reshape(-1, 1)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    z = (lse ** 2) * valid.reshape(-1)
    np.testing.assert_allclose(stats["probs"], probs.reshape(B, T, -1).sum(1), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(stats["router_z"], z.reshape(B, T).sum(1), rtol=2e-5)
    tokens = valid.sum(1)
    np.testing.assert_allclose(losses.router_z_loss(stats["router_z"][None], stats["tokens"]),
                               z.reshape(B, T).sum(1) / tokens, rtol=2e-5)
    # Sequence-wise balance loss (V3 eq. 17-20): f_i = E / (K T) * count_i, P_i = mean_t s'_{i,t}.
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    counts = np.asarray(stats["counts"])
    f = E / (K * tokens[:, None]) * counts
    P = probs.reshape(B, T, -1).sum(1) / tokens[:, None]
    np.testing.assert_allclose(losses.expert_balance_loss(stats["counts"][None], stats["probs"][None],
                                                          stats["tokens"], K), (f * P).sum(-1), rtol=2e-5)


def test_sequence_wise_balance_loss_is_per_packed_document(setup):
    """V3 eq. 17-20 per sequence: a row packing documents [1 1 1 2] (and one with padding)
    averages the per-document losses, from numpy counts of the layer's own top-k choices."""
    x, params, _ = setup
    seg = np.tile(np.array([1, 1, 1, 2]), (B, 1))
    seg[1] = [1, 2, 3, 0]
    seg[4] = [1, 1, 1, 1]
    _, stats = moe.MoE(CFG).apply({"params": params}, x, jnp.asarray(seg))
    logits = np.asarray(x, np.float64).reshape(B * T, -1) @ np.asarray(params["router"], np.float64)
    _, ids = moe.route(jnp.asarray(logits, jnp.float32), params["e_score_correction_bias"], CFG)
    ids = np.asarray(ids).reshape(B, T, -1)
    s = 1.0 / (1.0 + np.exp(-logits))
    sp = (s / s.sum(-1, keepdims=True)).reshape(B, T, -1)
    E, K = CFG.n_routed_experts, CFG.num_experts_per_tok
    want = np.zeros(B)
    for b in range(B):
        per_doc = []
        for d in sorted(set(seg[b].tolist()) - {0}):
            ts = np.flatnonzero(seg[b] == d)
            f = E / (K * len(ts)) * np.bincount(ids[b, ts].reshape(-1), minlength=E)
            per_doc.append(np.sum(f * sp[b, ts].mean(0)))
        want[b] = np.mean(per_doc)
    np.testing.assert_allclose(stats["seq_balance"], want, rtol=2e-5)
    # A one-document row is the per-row formula (expert_balance_loss).
    row = moe.MoE(CFG).apply({"params": params}, x)[1]
    np.testing.assert_allclose(row["seq_balance"], losses_lib.expert_balance_loss(
        row["counts"][None], row["probs"][None], row["tokens"], K), rtol=2e-5)


@pytest.mark.parametrize("factor", [0.75, 8.0])
def test_bounded_ep_buffers_drop_exactly_the_copies_past_a_full_peer_buffer(factor):
    """moe.ep_buffer_factor on a 2 data x 4 expert mesh (8 devices, 8 tokens each): every
    device sends its valid copies to each peer in token order through S = ceil(f n K / P)
    slots. Oracle in numpy: per (source device, peer) the copies past the S-th are dropped;
    the output is the dense reference with their gate weights zeroed. At f = 8 (S = the worst
    case) nothing is dropped and it equals exact dropless. The all-to-all moves P x S rows."""
    from deepseek_jax import expert_parallel, hlo_stats

    N, E, K, D, devices, peers = 64, 16, 4, 16, 8, 4
    x, ws, _, _ = _random_routing(jax.random.key(41), N, E, K, D=D)
    logits = jax.random.normal(jax.random.key(42), (N, E)) + 1.5 * (jnp.arange(E) < 6)  # peer 0 overflows
    weights, ids = jax.lax.top_k(jax.nn.softmax(logits), K)
    ids = ids.astype(jnp.int32)
    priority = np.zeros((N, K), np.float32)
    priority[40:44] = -1.0  # padding tokens: never sent, never counted
    cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=8,
                      ep_buffer_factor=factor)
    n, El = N // devices, E // peers
    S = min(int(np.ceil(factor * n * K / peers)), n * min(K, El))
    send = priority >= 0
    keep = np.zeros((N, K), bool)
    for dev in range(devices):
        used = np.zeros(peers, int)
        for t in range(dev * n, (dev + 1) * n):
            for k in range(K):
                p = int(ids[t, k]) // El
                if send[t, k]:
                    keep[t, k] = used[p] < S
                    used[p] += 1
    want_dropped = int((send & ~keep).sum())
    assert (want_dropped > 0) == (factor < 1)
    fn = jax.jit(lambda x, ws, w, i, p: expert_parallel.routed_experts(x, *ws, w, i, cfg, priority_NxK=p))
    with jax.set_mesh(sharding.make_mesh(MESHES["2data_4expert"])):
        y, dropped = fn(x, ws, weights, ids, jnp.asarray(priority))
        text = fn.lower(x, ws, weights, ids, jnp.asarray(priority)).compile().as_text()
    y_ref, _ = moe.expert_ffn_dense(x, *ws, jnp.where(jnp.asarray(keep), weights, 0.0), ids)
    assert int(dropped) == want_dropped
    assert _rel(y, y_ref) <= RTOL
    a2a = [c.bytes for c in hlo_stats.analyze(text, devices)["collectives"] if c.kind == "all-to-all"]
    assert max(a2a) == peers * S * D * 4, (a2a, S)
