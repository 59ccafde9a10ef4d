"""MoE token permutation: group token copies by expert, gather them (dispatch), and sum them back.

Dimension legend: T tokens, K experts per token, N = T * K token copies (flat index
n = t * K + k), E experts, D model width, B rows in one kernel block.

DeepSeekMoE (V2 §2.1, V3 §2.1.2, eq. 12) sends token t to its K routed experts and
mixes their outputs with the gate weights: out_t = sum_k w_tk * FFN_{e_tk}(x_t).
Grouped-matmul backends want the N copies laid out expert by expert:
- `sort_permutation` is a counting sort (a per-token histogram and prefix sums, no
  comparison sort): copies of one expert keep token-then-k order (stable), so every
  implementation produces the same layout;
- `dispatch` gathers x_sorted[i] = x[perm[i] // K];
- `combine` is the weighted scatter-add out[t] += w[n] * y_sorted[i] for perm[i] = n,
  computed as a gather through the inverse permutation (each token reads its K slots),
  which needs no atomics and sums in a fixed order.
The gradient of a gather is a scatter-add and vice versa, so each kernel's custom_vjp
calls the other one. Backend: the Triton lowering with power-of-two blocks; see
routing.py's docstring for why not Mosaic GPU in JAX 0.10.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Launch shape of the gather kernels; every field is a power of two (Triton).

    block_rows: output rows per program; block_d: columns per program (the kernel uses
    gcd(D, block_d), the largest power of two dividing both); num_warps: Triton warps.
    """

    block_rows: int = 32
    block_d: int = 128
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_rows", "block_d", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name}={value}; it must be a power of two >= 1")


# ------------------------------------------------------------------ counting sort (jnp)


def expert_histogram(expert_ids_TxK: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert: counts [E] int32 (a scatter-add histogram)."""
    return jnp.zeros((num_experts,), jnp.int32).at[expert_ids_TxK.reshape(-1)].add(1)


def sort_permutation(expert_ids_TxK: jax.Array, num_experts: int):
    """Stable grouping of the N = T*K token copies by expert, without a comparison sort.

    Returns perm [N] int32 (perm[i] = flat copy index t*K + k held by sorted slot i),
    counts [E] int32 and offsets [E+1] int32 (expert e owns slots offsets[e]:offsets[e+1]).
    The slot of copy (t, k) is offsets[e] + (copies of e in tokens before t) + (copies of
    e at k' < k in token t): the first term is an exclusive prefix sum over tokens of a
    per-token histogram [T, E] (int32, the size of the router logits), the second a
    [T, K, K] comparison (zero for top-k routing, whose K experts are distinct).
    """
    T, K = expert_ids_TxK.shape
    ids_TxK = expert_ids_TxK.astype(jnp.int32)
    rows_Tx1 = jnp.arange(T)[:, None]
    hist_TxE = jnp.zeros((T, num_experts), jnp.int32).at[rows_Tx1, ids_TxK].add(1)
    before_TxE = jnp.cumsum(hist_TxE, axis=0) - hist_TxE
    counts_E = before_TxE[-1] + hist_TxE[-1]
    offsets_Ep1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts_E, dtype=jnp.int32)])
    earlier_k_KxK = jnp.tril(jnp.ones((K, K), dtype=bool), k=-1)  # [k, k'] = k' < k
    same_in_token_TxK = ((ids_TxK[:, :, None] == ids_TxK[:, None, :]) & earlier_k_KxK).sum(-1, dtype=jnp.int32)
    slot_TxK = offsets_Ep1[ids_TxK] + jnp.take_along_axis(before_TxE, ids_TxK, axis=1) + same_in_token_TxK
    perm_N = jnp.zeros((T * K,), jnp.int32).at[slot_TxK.reshape(-1)].set(jnp.arange(T * K, dtype=jnp.int32))
    return perm_N, counts_E, offsets_Ep1


def _inverse_permutation(perm_N):
    """slot_N[n] = the sorted slot holding copy n (perm_N[slot_N[n]] == n)."""
    N = perm_N.shape[0]
    return jnp.zeros((N,), jnp.int32).at[perm_N].set(jnp.arange(N, dtype=jnp.int32))


# ----------------------------------------------------------------------------- kernels


def _gather_kernel(rows_ref, x_ref, out_ref):
    """out[b, :] = x[rows[b], :] for one block of rows and one block of columns."""
    out_ref[...] = x_ref[rows_ref[...], :]


def _weighted_gather_sum_kernel(slots_ref, weights_ref, y_ref, out_ref, *, top_k: int):
    """out[b, :] = sum_k w[k, b] * y[slots[k, b], :], summed in float32 in k order."""
    acc_BxD = jnp.zeros(out_ref.shape, jnp.float32)
    for k in range(top_k):
        w_B = weights_ref[k, :].astype(jnp.float32)
        acc_BxD = acc_BxD + w_B[:, None] * y_ref[slots_ref[k, :], :].astype(jnp.float32)
    out_ref[...] = acc_BxD.astype(out_ref.dtype)


def _launch_shape(rows: int, D: int, bs: BlockSizes):
    """(padded rows, column block): rows up to the block, columns split by a power of two."""
    return pl.cdiv(rows, bs.block_rows) * bs.block_rows, math.gcd(D, bs.block_d)


def _gather_rows(x_TxD, rows_M, interpret: bool, bs: BlockSizes):
    """x[rows] as a Pallas gather: [M] row ids -> [M, D]."""
    (M,), (T, D) = rows_M.shape, x_TxD.shape
    Mp, block_d = _launch_shape(M, D, bs)
    rows_Mp = jnp.pad(rows_M, (0, Mp - M))  # row 0 is valid; the padded outputs are dropped
    out = pl.pallas_call(
        _gather_kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, D), x_TxD.dtype),
        grid=(Mp // bs.block_rows, D // block_d),
        in_specs=[pl.BlockSpec((bs.block_rows,), lambda i, j: (i,)),
                  pl.BlockSpec((T, block_d), lambda i, j: (0, j))],  # all rows: any may be read
        out_specs=pl.BlockSpec((bs.block_rows, block_d), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=1),
        interpret=interpret,
        name="moe_gather",
    )(rows_Mp, x_TxD)
    return out[:M]


def _weighted_gather_sum(y_NxD, slots_TxK, weights_TxK, interpret: bool, bs: BlockSizes):
    """out[t] = sum_k weights[t, k] * y[slots[t, k]] as a Pallas kernel: -> [T, D]."""
    (T, K), (N, D) = slots_TxK.shape, y_NxD.shape
    Tp, block_d = _launch_shape(T, D, bs)
    # k-major so each program reads contiguous [B] rows of slots and weights.
    slots_KxTp = jnp.pad(slots_TxK.T, ((0, 0), (0, Tp - T)))
    weights_KxTp = jnp.pad(weights_TxK.T.astype(jnp.float32), ((0, 0), (0, Tp - T)))
    out = pl.pallas_call(
        functools.partial(_weighted_gather_sum_kernel, top_k=K),
        out_shape=jax.ShapeDtypeStruct((Tp, D), y_NxD.dtype),
        grid=(Tp // bs.block_rows, D // block_d),
        in_specs=[pl.BlockSpec((K, bs.block_rows), lambda i, j: (0, i)),
                  pl.BlockSpec((K, bs.block_rows), lambda i, j: (0, i)),
                  pl.BlockSpec((N, block_d), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bs.block_rows, block_d), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=1),
        interpret=interpret,
        name="moe_combine",
    )(slots_KxTp, weights_KxTp, y_NxD)
    return out[:T]


# ------------------------------------------------------------------ public + custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dispatch(x_TxD, perm_N, top_k, interpret, bs):
    return _gather_rows(x_TxD, perm_N // top_k, interpret, bs)


def _dispatch_fwd(x_TxD, perm_N, top_k, interpret, bs):
    return _dispatch(x_TxD, perm_N, top_k, interpret, bs), perm_N


def _dispatch_bwd(top_k, interpret, bs, perm_N, g_NxD):
    """dx[t] = sum_k g[slot(t, k)]: the scatter-add, i.e. combine with unit weights."""
    slots_TxK = _inverse_permutation(perm_N).reshape(-1, top_k)
    ones_TxK = jnp.ones(slots_TxK.shape, jnp.float32)
    return _weighted_gather_sum(g_NxD, slots_TxK, ones_TxK, interpret, bs), None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(y_NxD, perm_N, weights_TxK, interpret, bs):
    slots_TxK = _inverse_permutation(perm_N).reshape(weights_TxK.shape)
    return _weighted_gather_sum(y_NxD, slots_TxK, weights_TxK, interpret, bs)


def _combine_fwd(y_NxD, perm_N, weights_TxK, interpret, bs):
    out_TxD = _combine(y_NxD, perm_N, weights_TxK, interpret, bs)
    return out_TxD, (y_NxD, perm_N, weights_TxK)


def _combine_bwd(interpret, bs, residuals, g_TxD):
    """dy[i] = w[perm[i]] * g[perm[i] // K] (a gather); dw[t, k] = <g[t], y[slot(t, k)]>."""
    y_NxD, perm_N, weights_TxK = residuals
    T, K = weights_TxK.shape
    g_sorted_NxD = _gather_rows(g_TxD, perm_N // K, interpret, bs).astype(jnp.float32)
    w_sorted_N = weights_TxK.reshape(-1).astype(jnp.float32)[perm_N]
    dy_NxD = (g_sorted_NxD * w_sorted_N[:, None]).astype(y_NxD.dtype)
    y_copies_TxKxD = _gather_rows(y_NxD, _inverse_permutation(perm_N), interpret, bs).reshape(T, K, -1)
    dw_TxK = jnp.einsum("td,tkd->tk", g_TxD.astype(jnp.float32), y_copies_TxKxD.astype(jnp.float32))
    return dy_NxD, None, dw_TxK.astype(weights_TxK.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)


def _check_perm(perm_N, rows: int, top_k: int, what: str):
    if perm_N.ndim != 1 or perm_N.shape[0] != rows * top_k:
        raise ValueError(f"perm must be [T*K]=[{rows}*{top_k}] for {what}; got shape {perm_N.shape}")


def dispatch(x, perm, *, top_k, interpret=False, block_sizes=None):
    """Pallas gather: x [T, D], perm [T*K] -> x_sorted [T*K, D], x_sorted[i] = x[perm[i] // K]."""
    _check_perm(perm, x.shape[0], top_k, "dispatch (x is [T, D])")
    return _dispatch(x, perm.astype(jnp.int32), top_k, interpret, block_sizes or BlockSizes())


def combine(y_sorted, perm, weights, interpret=False, block_sizes=None):
    """Pallas weighted scatter-add: y_sorted [T*K, D], perm [T*K], weights [T, K] -> out [T, D].

    out[t] = sum_k weights[t, k] * y_sorted[i] where perm[i] = t*K + k (DeepSeek-V3 eq. 12),
    accumulated in float32 and returned in y_sorted's dtype.
    """
    T, K = weights.shape
    _check_perm(perm, T, K, "combine (weights is [T, K])")
    if y_sorted.shape[0] != T * K:
        raise ValueError(f"y_sorted must have T*K={T * K} rows; got shape {y_sorted.shape}")
    return _combine(y_sorted, perm.astype(jnp.int32), weights, interpret, block_sizes or BlockSizes())


# -------------------------------------------------------------------- jnp references


def expert_histogram_reference(expert_ids_TxK, num_experts):
    """counts [E] int32 with jnp.bincount."""
    return jnp.bincount(expert_ids_TxK.reshape(-1), length=num_experts).astype(jnp.int32)


def sort_permutation_reference(expert_ids_TxK, num_experts):
    """(perm, counts, offsets) with a stable comparison sort."""
    perm_N = jnp.argsort(expert_ids_TxK.reshape(-1), stable=True).astype(jnp.int32)
    counts_E = expert_histogram_reference(expert_ids_TxK, num_experts)
    return perm_N, counts_E, jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts_E, dtype=jnp.int32)])


def dispatch_reference(x, perm, *, top_k, interpret=False, block_sizes=None):
    """x_sorted[i] = x[perm[i] // K] with jnp indexing."""
    del interpret, block_sizes
    return x[perm // top_k]


def combine_reference(y_sorted, perm, weights, interpret=False, block_sizes=None):
    """out[t] = sum_k weights[t, k] * y_sorted[slot(t, k)] with a jnp scatter-add."""
    del interpret, block_sizes
    T, K = weights.shape
    w_sorted_N = weights.reshape(-1).astype(jnp.float32)[perm]
    contrib_NxD = y_sorted.astype(jnp.float32) * w_sorted_N[:, None]
    out_TxD = jnp.zeros((T, y_sorted.shape[1]), jnp.float32).at[perm // K].add(contrib_NxD)
    return out_TxD.astype(y_sorted.dtype)
