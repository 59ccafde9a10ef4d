"""Token permutation (pallas_kernels/permute.py) against NumPy oracles and the jnp references.

`TestPermute` runs the compiled kernels (GPU only); `TestPermuteInterpret` runs the same
tests with interpret=True on CPU, as in JAX's Pallas op tests.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cross_lowering, permute

ON_GPU = jax.default_backend() == "gpu"
BLOCK = permute.BlockSizes(block_rows=16, block_d=16)  # several row and column blocks

# name: (T, K, E, D, distinct experts per token as top-k routing gives)
CASES = {
    "t37_k2_e8": (37, 2, 8, 24, True),
    "t130_k6_e64": (130, 6, 64, 32, True),
    "t37_k4_e8_repeats": (37, 4, 8, 16, False),  # a token may list an expert twice
}


def _expert_ids(name):
    T, K, E, _, distinct = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    if distinct:
        return np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    return rng.integers(0, E, size=(T, K)).astype(np.int32)


def _numpy_combine(y_sorted, perm, weights):
    """out[t] = sum_k w[t, k] * y_sorted[i] with perm[i] = t*K + k, one copy at a time."""
    T, K = weights.shape
    out = np.zeros((T, y_sorted.shape[1]), np.float64)
    for i, n in enumerate(perm):
        out[n // K] += weights[n // K, n % K] * y_sorted[i]
    return out


@pytest.mark.parametrize("name", CASES)
def test_histogram_and_offsets_match_bincount(name):
    ids = _expert_ids(name)
    E = CASES[name][2]
    counts_np = np.bincount(ids.ravel(), minlength=E)
    np.testing.assert_array_equal(permute.expert_histogram(jnp.asarray(ids), E), counts_np)
    np.testing.assert_array_equal(permute.expert_histogram_reference(jnp.asarray(ids), E), counts_np)
    _, counts, offsets = permute.sort_permutation(jnp.asarray(ids), E)
    np.testing.assert_array_equal(counts, counts_np)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts_np)]))


@pytest.mark.parametrize("name", CASES)
def test_permutation_groups_by_expert_and_is_stable(name):
    ids = _expert_ids(name)
    T, K, E, *_ = CASES[name]
    perm, _, offsets = map(np.asarray, permute.sort_permutation(jnp.asarray(ids), E))
    np.testing.assert_array_equal(np.sort(perm), np.arange(T * K))  # a permutation
    for e in range(E):
        segment = perm[offsets[e]:offsets[e + 1]]
        assert (ids.ravel()[segment] == e).all()  # expert e's slots hold only its copies
        assert (np.diff(segment) > 0).all()  # in token-then-k order
    np.testing.assert_array_equal(perm, np.argsort(ids.ravel(), kind="stable"))
    np.testing.assert_array_equal(perm, permute.sort_permutation_reference(jnp.asarray(ids), E)[0])


@functools.lru_cache(maxsize=None)
def _kernel_and_reference(name, interpret):
    """One compiled function per case: dispatch, combine and their gradients, both ways."""
    T, K, E, D, _ = CASES[name]
    perm, _, _ = permute.sort_permutation(jnp.asarray(_expert_ids(name)), E)
    key_x, key_w, key_g = jax.random.split(jax.random.PRNGKey(sorted(CASES).index(name)), 3)
    x = jax.random.normal(key_x, (T, D))
    weights = jax.random.uniform(key_w, (T, K), minval=0.1)
    cot = jax.random.normal(key_g, (T, D))
    fns = {"kernel": (functools.partial(permute.dispatch, interpret=interpret, block_sizes=BLOCK),
                      functools.partial(permute.combine, interpret=interpret, block_sizes=BLOCK)),
           "reference": (permute.dispatch_reference, permute.combine_reference)}

    @jax.jit
    def run(x, weights, cot):
        out = {}
        for tag, (dispatch, combine) in fns.items():
            x_sorted = dispatch(x, perm, top_k=K)
            loss = lambda x, w: (combine(jnp.sin(dispatch(x, perm, top_k=K)), perm, w) * cot).sum()
            out[tag] = dict(x_sorted=x_sorted, combined=combine(x_sorted, perm, weights),
                            unit=combine(x_sorted, perm, jnp.ones_like(weights)),
                            grads=jax.grad(loss, argnums=(0, 1))(x, weights))
        return out

    return jax.tree.map(np.asarray, run(x, weights, cot)), np.asarray(perm), np.asarray(x), np.asarray(weights)


class TestPermute:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu_unless_interpreted(self):
        if not self.INTERPRET and not ON_GPU:
            pytest.skip("compiled Pallas kernels need a GPU; the interpret twin runs here")

    @pytest.mark.parametrize("name", CASES)
    def test_dispatch_gathers_token_copies(self, name):
        res, perm, x, _ = _kernel_and_reference(name, self.INTERPRET)
        K = CASES[name][1]
        np.testing.assert_array_equal(res["kernel"]["x_sorted"], x[perm // K])  # a gather is exact
        np.testing.assert_array_equal(res["reference"]["x_sorted"], x[perm // K])

    @pytest.mark.parametrize("name", CASES)
    def test_combine_matches_numpy_scatter_add(self, name):
        res, perm, x, weights = _kernel_and_reference(name, self.INTERPRET)
        expected = _numpy_combine(x[perm // CASES[name][1]], perm, weights)
        np.testing.assert_allclose(res["kernel"]["combined"], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(res["reference"]["combined"], expected, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("name", CASES)
    def test_dispatch_then_unit_combine_is_k_times_identity(self, name):
        res, _, x, _ = _kernel_and_reference(name, self.INTERPRET)
        np.testing.assert_allclose(res["kernel"]["unit"], CASES[name][1] * x, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("name", CASES)
    def test_grads_match_reference(self, name):
        res, *_ = _kernel_and_reference(name, self.INTERPRET)
        for got, want in zip(res["kernel"]["grads"], res["reference"]["grads"]):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())

    def test_normalised_weights_reconstruct_tokens(self):
        name = "t37_k2_e8"
        T, K, E, D, _ = CASES[name]
        _, perm, x, weights = _kernel_and_reference(name, self.INTERPRET)
        w_norm = jnp.asarray(weights / weights.sum(1, keepdims=True))
        x_sorted = permute.dispatch(jnp.asarray(x), jnp.asarray(perm), top_k=K, interpret=self.INTERPRET)
        out = permute.combine(x_sorted, jnp.asarray(perm), w_norm, interpret=self.INTERPRET)
        np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-6)


class TestPermuteInterpret(TestPermute):
    INTERPRET = True


def test_dispatch_combine_and_grads_lower_to_triton_for_cuda():
    """Non power-of-two blocks and unsupported gathers fail here, before any GPU run."""
    T, K, E, D = 130, 6, 64, 7168 // 64
    perm, _, _ = permute.sort_permutation(jnp.asarray(_expert_ids("t130_k6_e64")), E)
    loss = lambda x, w: permute.combine(permute.dispatch(x, perm, top_k=K), perm, w).sum()
    args = (jax.ShapeDtypeStruct((T, D), jnp.bfloat16), jax.ShapeDtypeStruct((T, K), jnp.float32))
    with cross_lowering.as_gpu():  # JAX >= 0.11 asks which GPU; without one, an H200
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3  # dispatch, combine and the gathers of their VJPs


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"perm must be \[T\*K\]"):
        permute.dispatch(jnp.zeros((4, 8)), jnp.zeros((7,), jnp.int32), top_k=2, interpret=True)
    with pytest.raises(ValueError, match="y_sorted must have T\\*K=8 rows"):
        permute.combine(jnp.zeros((6, 8)), jnp.zeros((8,), jnp.int32), jnp.ones((4, 2)), interpret=True)
