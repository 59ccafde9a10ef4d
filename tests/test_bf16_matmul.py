"""bf16 GEMMs (layers.bf16_matmul, einsum_f32, matmul_2d) against float64 NumPy.

The contract: bf16 operands, float32 accumulation and result; the backward rounds the
incoming gradient to bf16 (mixed-precision training as torch.autocast does it), returns the
activation's gradient in bf16 and a float32 master weight's gradient unrounded. The oracle
is NumPy in float64 on the bf16-rounded values, so the forward and the weight gradient must
agree to float32 accumulation error, and the activation gradient to one bf16 rounding.
On XLA:CPU, every such dot must also run with bf16 operands (YNNPACK's bf16 kernels), not be
upcast to a float32 GEMM behind our back (a transposed operand layout makes XLA do that).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers import cast, einsum_f32, matmul_2d, to_bf16

BF16_ULP = 2.0 ** -7  # relative spacing of bf16 numbers (8 significant bits)


def bf16(x) -> np.ndarray:
    """x rounded to bf16, as float64."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)).astype(np.float64)


def normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_matmul_2d_bf16_forward_and_gradients():
    x = jnp.asarray(normal(0, (2, 24, 40))).astype(jnp.bfloat16)  # activations, bf16
    w = jnp.asarray(normal(1, (40, 56)))  # float32 master weight
    g = normal(2, (2, 24, 56))  # float32 gradient of the float32 output
    y, vjp = jax.vjp(jax.jit(lambda x, w: matmul_2d(x, w, 1)), x, w)
    dx, dw = jax.jit(vjp)(jnp.asarray(g))

    x64, w64, g64 = bf16(x).reshape(48, 40), bf16(w), bf16(g).reshape(48, 56)
    assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y).reshape(48, 56), x64 @ w64, rtol=1e-5, atol=1e-5)
    # dw in float32 from the bf16-rounded gradient: an unrounded g (or a bf16 dw) is off by ~1e-3.
    np.testing.assert_allclose(np.asarray(dw), x64.T @ g64, rtol=1e-5, atol=1e-5)
    want_dx = g64 @ w64.T
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)).reshape(48, 40), want_dx,
                               rtol=BF16_ULP, atol=BF16_ULP * np.abs(want_dx).max())


SPECS = [  # (spec, a shape, b shape): the attention, MLA and decode dots of the models
    ("bthk,bshk->bhts", (2, 16, 4, 8), (2, 24, 4, 8)),  # scores
    ("bhts,bsha->btha", (2, 4, 16, 24), (2, 24, 4, 8)),  # probs @ v
    ("btgjk,bsgk->bgjts", (2, 16, 2, 2, 8), (2, 24, 2, 8)),  # GQA scores
    ("bthn,chn->bthc", (2, 16, 4, 8), (16, 4, 8)),  # MLA absorbed query
    ("bhts,bsc->bthc", (2, 4, 16, 24), (2, 24, 16)),  # MLA latent output
    ("bthc,bsc->bhts", (2, 1, 4, 16), (2, 24, 16)),  # one-token decode: M = H rows
    ("bhts,bsc->bthc", (2, 1, 1, 24), (2, 24, 16)),  # M = 1: upcast (no bf16 kernel takes it)
    ("mk,nk->nm", (16, 64), (24, 64)),  # the result transposed: it crashed at run time on CPU
    ("bmk,bkn->bmn", (2, 64, 64), (2, 64, 4)),  # attention's probs @ v: db as (g^T a)^T
    ("bmk,bkn->bmn", (2, 4, 64), (2, 64, 64)),  # a wide b: da as (b g^T)^T
]


@pytest.mark.parametrize("spec,a_shape,b_shape", SPECS)
def test_einsum_f32_bf16(spec, a_shape, b_shape):
    a = jnp.asarray(normal(0, a_shape)).astype(jnp.bfloat16)
    b = jnp.asarray(normal(1, b_shape)).astype(jnp.bfloat16)
    g = normal(2, jax.eval_shape(lambda a, b: einsum_f32(spec, a, b), a, b).shape)

    @jax.jit  # as in a train step: XLA lays out the whole program (eager dispatch hid a crash)
    def forward_and_gradients(a, b, g):
        y, vjp = jax.vjp(lambda a, b: einsum_f32(spec, a, b), a, b)
        return (y, *vjp(g))

    y, da, db = forward_and_gradients(a, b, jnp.asarray(g))

    a64, b64, g64 = bf16(a), bf16(b), bf16(g)
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    assert y.dtype == jnp.float32 and da.dtype == db.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y), np.einsum(spec, a64, b64), rtol=1e-5, atol=1e-5)
    for got, want in ((da, np.einsum(f"{out},{sb}->{sa}", g64, b64)),
                      (db, np.einsum(f"{out},{sa}->{sb}", g64, a64))):
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want,
                                   rtol=BF16_ULP, atol=BF16_ULP * np.abs(want).max())


def _dot_operand_types(hlo: str) -> list[str]:
    """The header (name and parameter types) of every computation whose body holds a dot."""
    found = []
    for header, body in re.findall(r"^%?([\w.\-]+ \([^)]*\) -> [^{]*)\{(.*?)^\}", hlo, re.M | re.S):
        if " dot(" in body:
            found.append(header)
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot kernels")
@pytest.mark.parametrize("M,K,N", [(64, 32, 96), (64, 64, 4), (4, 64, 64)])  # head-like, dw / dx transposed
def test_bf16_dots_stay_bf16_on_cpu(M, K, N):
    """Forward, dx and dw of a bf16 GEMM: three dots, each with bf16 operands."""
    x = jnp.zeros((M, K), jnp.bfloat16)
    w = jnp.zeros((K, N), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda x, w: matmul_2d(x, w, 1).sum(), argnums=(0, 1)))
    hlo = step.lower(x, w).compile().as_text()
    dots = _dot_operand_types(hlo)
    assert len(dots) == 3, dots
    for header in dots:
        params = re.findall(r": (\w+)\[", header.split("->")[0])
        assert params and all(p == "bf16" for p in params), (
            f"a dot was upcast to float32 (operand types {params}): {header}")


def _bits_to_f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def test_to_bf16_rounds_like_astype():
    """layers.to_bf16 (integer ops on the bits) against NumPy's float32 -> bfloat16 (ml_dtypes:
    round to nearest, ties to even), bit for bit, on the cases a rounding trick gets wrong:
    ties with an even and an odd last kept bit, a carry into the exponent, the largest
    finite floats (rounding up to inf), subnormals, signed zeros, infinities and nan."""
    special = _bits_to_f32([
        0x3F808000, 0x3F818000,  # ties: 1 + 2^-8 (keeps 1.0), 1 + 3 * 2^-8 (rounds up)
        0x3F807FFF, 0x3F808001,  # just below / above a tie
        0x3FFFFFFF, 0x3FFF8000,  # mantissa carry into the exponent
        0x7F7FFFFF, 0x7F7F7FFF, 0xFF7FFFFF,  # largest floats: to +inf, stays finite, to -inf
        0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,  # subnormals, a subnormal tie
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF,  # quiet, signalling, max-payload nan
    ])
    x = np.concatenate([special, normal(3, (4096,)) * np.float32(1e3), normal(4, (512,)) * np.float32(1e-39)])
    got = np.asarray(jax.jit(to_bf16)(jnp.asarray(x)))
    with np.errstate(invalid="ignore"):  # signalling nan
        want = x.astype(jnp.bfloat16)  # ml_dtypes, independent of XLA
    assert got.dtype == want.dtype
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_cast_gradient_is_the_converts():
    """d cast(x, bf16) / dx is the plain convert: the bf16 cotangent back in float32."""
    x = jnp.asarray(normal(5, (8, 16)))
    g = jnp.asarray(normal(6, (8, 16))).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: cast(x, jnp.bfloat16), x)
    (dx,) = vjp(g)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(g.astype(jnp.float32)))
