"""Routing kernel (pallas_kernels/routing.py) against route_reference and a NumPy oracle.

As in JAX's Pallas op tests, `TestRouting` runs the compiled kernel (GPU only) and its
twin `TestRoutingInterpret` runs the same tests with interpret=True on CPU.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cross_lowering, routing

ON_GPU = jax.default_backend() == "gpu"
BLOCK = routing.BlockSizes(block_t=16)  # T = 37 and 130 are not multiples: padding is exercised

# name: (T, E, K, n_groups, topk_groups, score_func, group_score, bias, norm_topk, scale)
CASES = {
    "v3_e256_k8_g8top4": (37, 256, 8, 8, 4, "sigmoid", "top2_sum", True, True, 2.5),
    "v2_e160_k6_g8top3": (37, 160, 6, 8, 3, "softmax", "max", False, False, 1.0),  # E, K not powers of 2
    "e64_k2_g4top1_top2": (130, 64, 2, 4, 1, "sigmoid", "top2_sum", False, True, 1.0),
    "e64_k8_g8top2_max": (37, 64, 8, 8, 2, "softmax", "max", True, True, 2.5),
    "e8_k1_nogroups": (37, 8, 1, 1, 1, "softmax", "max", False, False, 2.5),
    "e8_k2_g4top2_max": (130, 8, 2, 4, 2, "sigmoid", "max", True, False, 1.0),
    "e256_k1_g4top1_max": (37, 256, 1, 4, 1, "softmax", "max", True, False, 1.0),
    "e64_k8_nogroups_sig": (37, 64, 8, 1, 1, "sigmoid", "max", True, True, 1.0),
    "e256_k2_g8top3_top2": (37, 256, 2, 8, 3, "softmax", "top2_sum", False, False, 2.5),
}


def _kwargs(name):
    _, _, K, G, M, score_func, group_score, _, norm_topk, scale = CASES[name]
    return dict(top_k=K, n_groups=G, topk_groups=M, score_func=score_func, group_score=group_score,
                norm_topk=norm_topk, scale=scale)


@functools.lru_cache(maxsize=None)
def _kernel_and_reference(name, interpret):
    """One compiled function per case: weights, ids and gradients of kernel and reference."""
    T, E, K, *_ = CASES[name]
    has_bias = CASES[name][7]
    key_x, key_b, key_g = jax.random.split(jax.random.PRNGKey(sorted(CASES).index(name)), 3)
    logits = jax.random.normal(key_x, (T, E))
    bias = 0.05 * jax.random.normal(key_b, (E,)) if has_bias else None
    cot_TxK = jax.random.normal(key_g, (T, K))
    kernel = functools.partial(routing.route, interpret=interpret, block_sizes=BLOCK)

    @jax.jit
    def run(logits, bias, cot_TxK):
        out = {}
        for tag, fn in (("kernel", kernel), ("reference", routing.route_reference)):
            w, vjp_fn, ids = jax.vjp(lambda x, b: fn(x, b, **_kwargs(name)), logits, bias, has_aux=True)
            dlogits, dbias = vjp_fn(cot_TxK)
            out[tag] = (w, ids, dlogits, dbias)
        return out

    return jax.tree.map(np.asarray, run(logits, bias, cot_TxK))


def _by_expert(w_TxK, ids_TxK):
    """Rows reordered by expert id, so weights compare whatever the output order."""
    order_TxK = np.argsort(ids_TxK, axis=1)
    return np.take_along_axis(w_TxK, order_TxK, 1), np.take_along_axis(ids_TxK, order_TxK, 1)


class TestRouting:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu_unless_interpreted(self):
        if not self.INTERPRET and not ON_GPU:
            pytest.skip("compiled Pallas kernels need a GPU; the interpret twin runs here")

    @pytest.mark.parametrize("name", CASES)
    def test_forward_matches_reference(self, name):
        res = _kernel_and_reference(name, self.INTERPRET)
        w, ids = _by_expert(*res["kernel"][:2])
        w_ref, ids_ref = _by_expert(*res["reference"][:2])
        assert res["kernel"][1].dtype == np.int32 and res["kernel"][0].dtype == np.float32
        np.testing.assert_array_equal(ids, ids_ref)  # same expert sets per token
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("name", CASES)
    def test_grad_matches_reference(self, name):
        res = _kernel_and_reference(name, self.INTERPRET)
        dlogits, dlogits_ref = res["kernel"][2], res["reference"][2]
        scale = np.abs(dlogits_ref).max()
        assert scale > 0
        np.testing.assert_allclose(dlogits, dlogits_ref, rtol=0, atol=1e-5 * scale)
        if CASES[name][7]:  # the bias only selects: no gradient reaches it
            np.testing.assert_array_equal(res["kernel"][3], 0.0)
            np.testing.assert_array_equal(res["reference"][3], 0.0)

    def test_exact_ties_pick_lowest_index_like_lax_top_k(self):
        route = functools.partial(routing.route, interpret=self.INTERPRET, block_sizes=BLOCK)
        # Row 0: all experts equal. Row 1: every group's max is 2, so groups 0 and 1
        # win the group tie and experts 1, 2 (value 2 inside them) are chosen.
        # Row 2: groups 0, 1 and 3 tie on top-2 sum; 0 and 1 are kept.
        logits = jnp.array([[0.0] * 8,
                            [0, 2, 2, 0, 2, 0, 0, 2],
                            [1, 1, 1, 1, 0, 0, 1, 1]], jnp.float32)
        cases = [(dict(top_k=3, score_func="sigmoid"), [[0, 1, 2], [1, 2, 4], [0, 1, 2]]),
                 (dict(top_k=2, n_groups=4, topk_groups=2, group_score="max"), [[0, 1], [1, 2], [0, 1]]),
                 (dict(top_k=4, n_groups=4, topk_groups=2, group_score="top2_sum"), [[0, 1, 2, 3], [1, 2, 0, 3],
                                                                                   [0, 1, 2, 3]])]
        for kw, expected in cases:
            w, ids = route(logits, None, **kw)
            w_ref, ids_ref = routing.route_reference(logits, None, **kw)
            np.testing.assert_array_equal(ids_ref, expected)  # lax.top_k's own tie order
            np.testing.assert_array_equal(ids, ids_ref)
            np.testing.assert_allclose(w, w_ref, atol=1e-7)

    def test_v3_hand_case_bias_selects_but_does_not_weigh(self):
        w, ids = routing.route(*_HAND_INPUTS, interpret=self.INTERPRET, block_sizes=BLOCK, **_HAND_KWARGS)
        _assert_hand_case(np.asarray(w), np.asarray(ids))


class TestRoutingInterpret(TestRouting):
    INTERPRET = True


# ---------------------------------------------------------------- NumPy oracle


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_route(logits, bias, *, top_k, n_groups, topk_groups, score_func, group_score, norm_topk, scale):
    """Token-by-token re-implementation of DeepSeek-V2/V3 routing (V3 eq. 12-16) in float64."""
    logits = np.asarray(logits, np.float64)
    T, E = logits.shape
    S = E // n_groups
    weights, ids = np.zeros((T, top_k)), np.zeros((T, top_k), np.int64)
    for t in range(T):
        if score_func == "softmax":
            s = np.exp(logits[t] - logits[t].max())
            s /= s.sum()
        else:
            s = _sigmoid(logits[t])
        choice = s + (0.0 if bias is None else np.asarray(bias, np.float64))
        group_vals = [np.sort(choice[g * S:(g + 1) * S])[::-1] for g in range(n_groups)]
        gscore = np.array([v[0] if group_score == "max" else v[0] + v[1] for v in group_vals])
        kept_groups = np.argsort(-gscore, kind="stable")[:topk_groups]
        allowed = np.isin(np.arange(E) // S, kept_groups)
        masked = np.where(allowed, choice, -np.inf)
        ids[t] = np.argsort(-masked, kind="stable")[:top_k]
        w = s[ids[t]]
        weights[t] = (w / w.sum() if norm_topk else w) * scale
    return weights, ids


# One token, E = 8 in 4 groups of 2, V3 settings. Unbiased, experts 0 (sigmoid(2)) and 4
# (sigmoid(1.8)) score highest, but group 2 (experts 4, 5) loses the group vote to
# groups 0 and 1, so 4 is masked. A +0.5 bias on expert 2 lifts its choice score to 1.0,
# so it displaces expert 1; its weight still uses the un-biased sigmoid(0) = 0.5.
_HAND_INPUTS = (jnp.array([[2.0, 1.5, 0.0, 0.0, 1.8, -3.0, -1.0, -1.0]]),
                jnp.array([0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]))
_HAND_KWARGS = dict(top_k=2, n_groups=4, topk_groups=2, score_func="sigmoid", group_score="top2_sum",
                    norm_topk=True, scale=2.5)


def _assert_hand_case(w, ids):
    np.testing.assert_array_equal(ids, [[2, 0]])
    s0, s2 = _sigmoid(2.0), 0.5
    np.testing.assert_allclose(w, [[2.5 * s2 / (s0 + s2), 2.5 * s0 / (s0 + s2)]], rtol=1e-6)


def test_reference_hand_case_and_numpy_oracle():
    w, ids = routing.route_reference(*_HAND_INPUTS, **_HAND_KWARGS)
    _assert_hand_case(np.asarray(w), np.asarray(ids))
    w_np, ids_np = _numpy_route(*_HAND_INPUTS, **_HAND_KWARGS)
    _assert_hand_case(w_np, ids_np)
    # Without the bias, expert 1 is chosen instead of 2; expert 4 never (its group is masked).
    w0, ids0 = routing.route_reference(_HAND_INPUTS[0], None, **_HAND_KWARGS)
    np.testing.assert_array_equal(ids0, [[0, 1]])


@pytest.mark.parametrize("name", ["v3_e256_k8_g8top4", "v2_e160_k6_g8top3", "e8_k2_g4top2_max"])
def test_reference_matches_numpy_oracle(name):
    T, E, *_ = CASES[name]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(T, E)).astype(np.float32)
    bias = (0.05 * rng.normal(size=E)).astype(np.float32) if CASES[name][7] else None
    w, ids = routing.route_reference(jnp.asarray(logits), None if bias is None else jnp.asarray(bias),
                                     **_kwargs(name))
    w_np, ids_np = _numpy_route(logits, bias, **_kwargs(name))
    np.testing.assert_array_equal(ids, ids_np)
    np.testing.assert_allclose(w, w_np, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- GPU lowering, errors


@pytest.mark.parametrize("name", ["v3_e256_k8_g8top4", "v2_e160_k6_g8top3"])
def test_kernel_and_grad_lower_to_triton_for_cuda(name):
    """GPU-only failures (non power-of-two shapes, unsupported ops) show up at lowering.

    Lowering for the "cuda" platform runs on a CPU machine; it stops before Triton
    compiles the kernel to PTX, so it is a necessary, not a sufficient, check.
    """
    T, E, K, *_ = CASES[name]
    loss = lambda x, b: routing.route(x, b, **_kwargs(name))[0].sum()
    args = (jax.ShapeDtypeStruct((T, E), jnp.bfloat16), jax.ShapeDtypeStruct((E,), jnp.float32))
    with cross_lowering.as_gpu():  # JAX >= 0.11 asks which GPU; without one, an H200
        text = jax.jit(jax.value_and_grad(loss)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text  # the Triton kernel's custom call
    assert not re.search(r"chlo\.top_k|stablehlo\.sort", text)  # selection runs in the kernel, not XLA


def test_route_rejects_bad_arguments():
    logits = jnp.zeros((4, 12))
    with pytest.raises(ValueError, match="n_groups=5 must divide E=12"):
        routing.route(logits, None, top_k=2, n_groups=5, topk_groups=1, interpret=True)
    with pytest.raises(ValueError, match="top_k=13"):
        routing.route(logits, None, top_k=13, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        routing.BlockSizes(block_t=12)
