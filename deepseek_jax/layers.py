"""Building blocks: RMSNorm, embeddings, RoPE with YaRN, SwiGLU MLP.

Dimension legend: B batch, T time, D model width, F feed-forward width, V vocabulary,
H heads, R rotary dims (even), ... any leading dims.

Parameters are float32 and carry logical axis names (DESIGN.md: embed, heads, kv_lora, mlp,
expert, vocab) so `sharding.py` can place them; activations run in `config.dtype`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from deepseek_jax import gpu_kernels
from deepseek_jax.config import ModelConfig, RopeScaling

DEFAULT_INIT_STD = 0.02


def param_with_axes(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[Optional[str]],
                    init=None) -> jax.Array:
    """A float32 parameter annotated with logical axis names (no-op without a mesh)."""
    init = init or nn.initializers.normal(DEFAULT_INIT_STD)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """Activation sharding hint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, tuple(axes))


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(spec, a, b) accumulated in, and returned as, float32 for any operand dtype.

    bf16 operands go through `bf16_matmul` (bf16 GEMMs with float32 accumulation, forward and
    backward, on every platform) once the einsum is rearranged into a batched [M, K] @ [K, N]:
    batch dims first, then each side's free dims, then the contracted ones. Other mixes, and
    the dots XLA:CPU has no bf16 kernel for (a vector side or tiny sizes: YNNPACK declines
    them and XLA's own DotThunk raises "UNIMPLEMENTED: BF16 x BF16 = F32"), upcast both
    operands on CPU, which is exact: a product of two bf16 numbers is exact in f32 and the sum
    is f32 either way.
    """
    f32 = jnp.float32
    if a.dtype == f32 and b.dtype == f32:
        return jnp.einsum(spec, a, b)
    if a.dtype == b.dtype == jnp.bfloat16:
        y = _einsum_as_batched_matmul(spec, a, b)
        if y is not None:
            return y
    if gpu_kernels.target_platform() == "cpu":
        return jnp.einsum(spec, a.astype(f32), b.astype(f32))
    return jnp.einsum(spec, a, b, preferred_element_type=f32)


def _einsum_as_batched_matmul(spec: str, a: jax.Array, b: jax.Array) -> Optional[jax.Array]:
    """einsum(spec, a, b) as bf16_matmul([batch, M, K], [batch, K, N]); None if it is not one."""
    ins, out = spec.replace(" ", "").split("->")
    sa, sb = ins.split(",")
    if any(len(set(s)) != len(s) for s in (sa, sb, out)) or (set(sa) ^ set(sb)) - set(out):
        return None  # a repeated index, or one summed over on one side only
    batch = [c for c in out if c in sa and c in sb]
    con = [c for c in sa if c in sb and c not in out]
    m = [c for c in out if c in sa and c not in sb]
    n = [c for c in out if c in sb and c not in sa]
    size = {**dict(zip(sa, a.shape)), **dict(zip(sb, b.shape))}
    B, M, K, N = (math.prod(size[c] for c in dims) for dims in (batch, m, con, n))
    if gpu_kernels.target_platform() == "cpu" and (M == 1 or N == 1 or max(M, K, N) < 8):
        return None
    a_BxMxK = jnp.transpose(a, [sa.index(c) for c in batch + m + con]).reshape(B, M, K)
    b_BxKxN = jnp.transpose(b, [sb.index(c) for c in batch + con + n]).reshape(B, K, N)
    y = bf16_matmul(a_BxMxK, b_BxKxN).reshape([size[c] for c in batch + m + n])
    return jnp.transpose(y, [(batch + m + n).index(c) for c in out])


def matmul_2d(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x @ kernel contracting x's last `n_in` dims with the kernel's first `n_in`, in float32
    (operands in x's dtype; bf16 ones through `bf16_matmul`).

    Both sides are flattened to 2-D first: XLA:CPU lowers a dot with several free (batch, time)
    dims 2x slower than the same GEMM on [B*T, D] (the vocab head: 1.8 s vs 0.8 s fwd+bwd).
    """
    lead, k_in, k_out = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
    K = math.prod(k_in)
    x_MxK, w_KxN = x.reshape(-1, K), kernel.reshape(K, -1)
    if x.dtype == jnp.bfloat16:
        y = bf16_matmul(x_MxK, w_KxN)
    else:
        y = einsum_f32("mk,kn->mn", x_MxK, w_KxN.astype(x.dtype))
    return y.reshape(*lead, *k_out)


def row_major(x: jax.Array) -> jax.Array:
    """x, stored row-major when building for CPU.

    XLA:CPU hands a bf16 x bf16 -> f32 dot to YNNPACK (AMX / AVX512-BF16 kernels: 3-4x its
    float32 GEMM on a Sapphire Rapids core) only when both operands are row-major [.., M, K] @
    [.., K, N]; a transposed view (to XLA a layout change, not a copy) makes it upcast both
    operands and run the float32 GEMM. The constraint makes XLA write such an operand out
    transposed, one pass over it.
    """
    if gpu_kernels.target_platform() != "cpu":
        return x
    return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


def dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b ([.., M, K] @ [.., K, N]) with float32 accumulation and result, no custom gradient
    (see bf16_matmul); bf16 operands and the result laid out for XLA:CPU's bf16 kernels."""
    if a.dtype != jnp.bfloat16:
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)
    # The result too: a dot whose result is transposed next may otherwise get a column-major
    # result, which YNNPACK declines after XLA has already decided not to upcast it, and the
    # dot then fails at run time (DotThunk: "UNIMPLEMENTED: BF16 x BF16 = F32").
    return row_major(jnp.matmul(row_major(a), row_major(b), preferred_element_type=jnp.float32))


def cast(x: jax.Array, dtype) -> jax.Array:
    """x.astype(dtype), with float32 -> bfloat16 through `to_bf16` (same values, faster on CPU)."""
    if jnp.dtype(dtype) == jnp.bfloat16 and x.dtype == jnp.float32:
        return to_bf16(x)
    return x.astype(dtype)


@jax.custom_jvp
def to_bf16(x_f32: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounded to nearest even: bit for bit `x.astype(jnp.bfloat16)`.

    On CPU by integer ops on the bits (add half an ulp and the tie-breaking bit, keep the top
    16 bits; nan stays a quiet nan): XLA:CPU's own convert keeps some loop fusions from being
    vectorised: the output head's gradient pass (exp, a one-hot, the rounding) ran 2.2x
    faster this way on a 2-core Xeon (71 -> 33 ms, [2048, 32000]), the bench model's bf16
    train step ~7% (interleaved A/B). The derivative is the ordinary convert.
    """
    if gpu_kernels.target_platform() != "cpu":
        return x_f32.astype(jnp.bfloat16)
    bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = jnp.where(jnp.isnan(x_f32), jnp.uint32(0x7FC0), rounded)
    return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


to_bf16.defjvps(lambda t, _, x: t.astype(jnp.bfloat16))


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


@jax.custom_vjp
def bf16_matmul(a_xMxK: jax.Array, b_xKxN: jax.Array) -> jax.Array:
    """a @ b ([M, K] @ [K, N], or batched [B, M, K] @ [B, K, N]) with bf16 operands (b is
    cast), float32 accumulation and a float32 result.

    The backward rounds the incoming float32 gradient to bf16 and runs both gradient GEMMs
    with bf16 operands and float32 accumulation too: the usual mixed-precision backward
    (torch.autocast, Megatron, flash attention's dS), as fast as the forward. Autodiff of the
    forward dot would instead multiply the float32 gradient with the other operand upcast, a
    float32 GEMM. da comes back in a's dtype (bf16) and db in b's, unrounded for float32
    master weights.
    """
    return dot_f32(a_xMxK, cast(b_xKxN, jnp.bfloat16))


def _bf16_matmul_fwd(a_xMxK, b_xKxN):
    return bf16_matmul(a_xMxK, b_xKxN), (a_xMxK, b_xKxN)


def _bf16_matmul_bwd(res, g_xMxN):
    a_xMxK, b_xKxN = res
    g_xMxN, b_xKxN16 = cast(g_xMxN, jnp.bfloat16), cast(b_xKxN, jnp.bfloat16)
    # Each gradient GEMM needs one operand transposed, and on CPU a transposed bf16 operand is
    # a copy (see row_major), slow for big ones (XLA:CPU's transpose: ~2 ns per element).
    # da = g b^T copies b; da^T = b g^T copies g and then the float32 result instead. Take
    # the cheaper in elements moved (a float32 result counts twice): for attention's
    # probs @ v, db = probs^T dO would copy the [T, S] probabilities, db^T = dO^T probs only
    # the [T, A] dO and the [S, A] result (core attention, fwd + bwd, bench shapes: -22%).
    (M, K), N = a_xMxK.shape[-2:], b_xKxN.shape[-1]
    if K * N <= M * N + 2 * M * K:
        da = dot_f32(g_xMxN, _swap(b_xKxN16))
    else:
        da = _swap(dot_f32(b_xKxN16, _swap(g_xMxN)))
    if M * K <= M * N + 2 * N * K:
        db = dot_f32(_swap(a_xMxK), g_xMxN)
    else:
        db = _swap(dot_f32(_swap(g_xMxN), a_xMxK))
    return cast(da, a_xMxK.dtype), cast(db, b_xKxN.dtype)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


class RMSNorm(nn.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), statistics in float32 (as the reference code)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * cast(y, x.dtype)


class Embed(nn.Module):
    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        # In setup, not @compact: `attend` (the tied output head) reads the same table.
        self.embedding = param_with_axes(self, "embedding", (self.vocab_size, self.features),
                                         ("vocab", "embed"))

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, tokens_BxT, axis=0).astype(self.dtype)

    def attend(self, h_BxTxD: jax.Array) -> jax.Array:
        """Tied output head: float32 logits h @ embedding^T."""
        return matmul_2d(h_BxTxD, self.embedding.T.astype(h_BxTxD.dtype), 1)


class Dense(nn.Module):
    """x @ W for a kernel of any rank: contracts the last `len(in_shape)` dims of x."""

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    axes: Sequence[Optional[str]]
    dtype: jnp.dtype = jnp.float32
    out_dtype: Optional[jnp.dtype] = None  # default: dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param_with_axes(self, "kernel", (*self.in_shape, *self.out_shape), self.axes)
        y = matmul_2d(x.astype(self.dtype), kernel, len(self.in_shape))
        return cast(y, self.out_dtype or self.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        D, F = self.hidden_size, self.intermediate_size
        gate = Dense((D,), (F,), ("embed", "mlp"), self.dtype, name="gate_proj")(x_BxTxD)
        up = Dense((D,), (F,), ("embed", "mlp"), self.dtype, name="up_proj")(x_BxTxD)
        h_BxTxF = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Dense((F,), (D,), ("mlp", "embed"), self.dtype, name="down_proj")(h_BxTxF)


# ----- rotary position embeddings ----------------------------------------------------------

def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature correction: 0.1 * m * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, scaling: Optional[RopeScaling]) -> tuple[jax.Array, float]:
    """Inverse frequencies [dim/2] and the cos/sin multiplier ("attention factor").

    Without scaling: theta^(-2i/dim). With YaRN (arXiv:2309.00071 eq. 18-19): high-frequency
    dims keep their frequency (extrapolation), low-frequency dims are divided by `factor`
    (interpolation), with a linear ramp between the correction dims for beta_fast / beta_slow.
    """
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    pos_freqs = jnp.asarray(theta, jnp.float32) ** exponents
    inv_extrapolation = 1.0 / pos_freqs
    if scaling is None:
        return inv_extrapolation, 1.0
    s = scaling
    inv_interpolation = 1.0 / (s.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    # The cos/sin multiplier: the ratio of the two mscales (1.0 for DeepSeek, where they are equal);
    # the remaining mscale_all_dim^2 goes into the softmax scale (see `softmax_scale`).
    if s.mscale and s.mscale_all_dim:
        attention_factor = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(s.factor)
    return inv_freq, attention_factor


def softmax_scale(head_dim: int, scaling: Optional[RopeScaling]) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3 MLA)."""
    scale = head_dim ** -0.5
    if scaling is not None and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


def rope_cos_sin(positions_BxT: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, R/2] in float32, already multiplied by the YaRN attention factor."""
    inv_freq, factor = rope_inv_freq(config.rope_dim, config.rope_theta, config.rope_scaling)
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x_BxTxHxR: jax.Array, cos_BxTxR2: jax.Array, sin_BxTxR2: jax.Array,
               interleave: bool) -> jax.Array:
    """Rotate pairs of dims by position.

    interleave=True pairs (x0, x1), (x2, x3), ... (DeepSeek checkpoints); False pairs the two
    halves (x_i, x_{i+R/2}) (Llama). Both return the rotated pairs in half layout
    [x1', x2']: q and k are permuted identically, so q.k is unchanged.
    """
    if interleave:
        x1, x2 = x_BxTxHxR[..., 0::2], x_BxTxHxR[..., 1::2]
    else:
        half = x_BxTxHxR.shape[-1] // 2
        x1, x2 = x_BxTxHxR[..., :half], x_BxTxHxR[..., half:]
    cos = cos_BxTxR2[:, :, None, :]
    sin = sin_BxTxR2[:, :, None, :]
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return cast(out, x_BxTxHxR.dtype)
