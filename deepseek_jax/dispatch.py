"""Local token dispatch: the routed experts on one device's tokens, three backends.

Dimension legend: D model width, F expert width (moe_intermediate_size), E routed experts
(local ones under expert parallelism), K experts per token, N tokens, M = N*K token copies,
C capacity, R rows per tile, Nt tiles, P padded rows.

Every backend computes out[n] = sum_{k<K} w[n, k] * SwiGLU_{ids[n, k]}(x[n]) (`config.moe_dispatch`):
  dense     every expert on every token, combined with a [N, E] weight matrix (test oracle)
  dropless  token copies sorted by expert, one grouped matmul, nothing dropped
  capacity  a compute budget; overflowing copies are dropped and counted
            (`config.capacity_policy`):
            "affinity"  DeepSeek-V2 §2.2.4: a budget per DEVICE of ceil(N K * capacity_factor)
                        copies (capacity factor 1.0 = the average load per device); the copies
                        with the LOWEST affinity scores are dropped until the budget holds, and
                        copies of protected rows (~10% of training sequences) are never dropped.
                        On one device holding every expert the budget is N K * factor, so with
                        factor >= 1 nothing is dropped: dropping balances devices.
            "gshard"    GShard / Switch: C = ceil(N K / E * capacity_factor) slots per expert,
                        all first choices before any second choice, then token order.

Dropless has two grouped-matmul implementations, picked per platform (`grouped_impl`):
  ragged  `jax.lax.ragged_dot` (GPU/TPU: XLA has grouped kernels there).
  tiled   XLA:CPU lowers ragged_dot to a masked dot over all E groups (E times the FLOPs,
          and likewise its weight gradient), so on CPU we use a block-sparse layout
          (MegaBlocks, arXiv:2211.15841): copies sorted by expert, each expert's group
          padded to a multiple of R rows, a static Nt = ceil(M / R) + E tiles (enough for
          any routing, so nothing is ever dropped), each tile owned by one expert. `gmm`
          loops over the tiles IN USE (a while loop, custom_vjp) with one [R, D] x [D, F]
          matmul each against its expert's weights, read in place; its gradient is the same
          loop with the weights transposed plus a loop accumulating each expert's weight
          gradient. A batched einsum over all Nt tiles was 2-3x slower on CPU: it computes
          empty tiles and materialises a weight copy per tile. Padding costs at most E * R
          rows, so R shrinks as E grows (`dropless_tile_rows`). Dispatch and combine are
          gathers whose gradients are gathers too (`permute_rows`): XLA:CPU scatters are slow.

Imports go one way: moe.py (router, layer) -> expert_parallel.py (shard_map) -> this file.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from deepseek_jax import gpu_kernels
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import cast, dot_f32, row_major


def swiglu(x, w_gate, w_up, w_down, spec_in: str, spec_out: str):
    h = jax.nn.silu(jnp.einsum(spec_in, x, w_gate)) * jnp.einsum(spec_in, x, w_up)
    return jnp.einsum(spec_out, h, w_down)


def combine(y_MxD, weights_NxK):
    N, K = weights_NxK.shape
    return jnp.einsum("nkd,nk->nd", y_MxD.reshape(N, K, -1), weights_NxK.astype(y_MxD.dtype))


def expert_ffn_dense(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK):
    """Reference: all experts on all tokens (E times the useful FLOPs)."""
    N, E = x_NxD.shape[0], w_gate_ExDxF.shape[0]
    y_NxExD = swiglu(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, "nd,edf->nef", "nef,efd->ned")
    combine_NxE = jnp.zeros((N, E), weights_NxK.dtype).at[jnp.arange(N)[:, None], ids_NxK].add(weights_NxK)
    return jnp.einsum("ned,ne->nd", y_NxExD, combine_NxE.astype(y_NxExD.dtype)), jnp.zeros((), jnp.int32)


# ----- dropless: grouped matmul over copies sorted by expert ------------------------------------

def grouped_impl() -> str:
    """'tiled' on CPU; on GPU 'tokamax' (XLA:GPU lowers ragged_dot to a dense dot over all E
    experts: gpu_kernels.py); 'ragged' on TPU, where XLA has grouped-matmul kernels."""
    return {"cpu": "tiled", "gpu": "tokamax"}.get(gpu_kernels.target_platform(), "ragged")


def dropless_tile_rows(num_copies: int, num_experts: int) -> int:
    """Rows per tile R: a power of two in [8, 128] with E * R <= M / 2 where possible.

    Each expert wastes < R padded rows, so E * R bounds the extra work; large tiles keep
    the CPU matmuls efficient, so take the largest R that keeps the waste small.
    """
    target = max(1, num_copies // (2 * num_experts))
    return int(min(128, max(8, 2 ** int(math.log2(target)))))


def tile_layout(ids_M: jax.Array, valid_M: jax.Array, num_experts: int, rows: int, num_tiles: int):
    """Block-sparse layout of token copies: (row_M, tile_expert_Nt, n_used).

    row_M: the padded buffer row of each copy (num_tiles * rows for invalid copies, a
    row that does not exist, so scatters drop it); tile_expert_Nt: the expert owning each
    tile (unused trailing tiles get the last expert and only zero rows); n_used: the
    number of tiles holding any copy (they come first).
    """
    E, R = num_experts, rows
    M = ids_M.shape[0]
    bucket_M = jnp.where(valid_M, ids_M, E)  # invalid copies sort last, in their own bucket
    counts_E = jnp.bincount(bucket_M, length=E + 1)[:E].astype(jnp.int32)
    tiles_E = (counts_E + R - 1) // R
    tile_end_E = jnp.cumsum(tiles_E)
    order_M = jnp.argsort(bucket_M, stable=True)
    sorted_bucket_M = bucket_M[order_M]
    e_sorted = jnp.minimum(sorted_bucket_M, E - 1)
    start_E = jnp.cumsum(counts_E) - counts_E
    rank_M = jnp.arange(M, dtype=jnp.int32) - start_E[e_sorted]
    row_sorted_M = jnp.where(sorted_bucket_M < E, (tile_end_E - tiles_E)[e_sorted] * R + rank_M, num_tiles * R)
    row_M = jnp.zeros((M,), jnp.int32).at[order_M].set(row_sorted_M.astype(jnp.int32))
    tile_expert_Nt = jnp.searchsorted(tile_end_E, jnp.arange(num_tiles), side="right")
    return row_M, jnp.minimum(tile_expert_Nt, E - 1).astype(jnp.int32), tile_end_E[-1]


def _varying(a) -> set:
    """Mesh axes a value varies over inside shard_map (empty outside)."""
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    return set(mat.varying) if mat is not None else set(getattr(jax.typeof(a), "vma", ()))


def _tile_loop(n_used, body, init, *operands):
    # A while loop over the tiles in use only: unused tiles cost nothing (a batched einsum
    # would compute all Nt and materialise each tile's copy of its expert's weights).
    # Inside shard_map the carry must vary over the same mesh axes as the operands.
    vma = set().union(*(_varying(a) for a in operands)) - _varying(init)
    if vma:
        init = jax.lax.pcast(init, tuple(sorted(vma)), to="varying")
    return jax.lax.fori_loop(0, n_used, body, init)


def _gmm_fwd_impl(x_PxD, w_ExDxF, tile_expert_Nt, n_used, rows: int, transpose_w: bool):
    """out[tile t] = x[tile t] @ w[expert of t] (or its transpose), for the tiles in use."""
    F = w_ExDxF.shape[1] if transpose_w else w_ExDxF.shape[2]
    # A float32 buffer, cast once at the end: XLA:CPU computes a bf16 dynamic-update-slice in
    # float32, converting the WHOLE buffer there and back on every tile (not in place): that
    # was ~13% of the bench model's bf16 train step.
    out = jnp.zeros((x_PxD.shape[0], F), jnp.float32)

    if transpose_w and x_PxD.dtype == jnp.bfloat16:
        # bf16 tiles run on XLA:CPU's bf16 kernels only with row-major operands (dot_f32), so
        # a transposed weight would be copied on every tile: transpose each expert once.
        w_ExDxF, transpose_w = row_major(jnp.swapaxes(w_ExDxF, 1, 2)), False

    def body(t, out):
        xt_RxD = jax.lax.dynamic_slice_in_dim(x_PxD, t * rows, rows)
        w_DxF = jax.lax.dynamic_index_in_dim(w_ExDxF, tile_expert_Nt[t], keepdims=False)
        y = dot_f32(xt_RxD, w_DxF.T if transpose_w else w_DxF)
        return jax.lax.dynamic_update_slice_in_dim(out, y, t * rows, 0)

    return cast(_tile_loop(n_used, body, out, x_PxD, w_ExDxF, tile_expert_Nt, n_used), x_PxD.dtype)


def _tgmm(x_PxD, g_PxF, tile_expert_Nt, n_used, rows: int, num_experts: int, dtype):
    """dw[e] = sum over e's tiles of x[t]^T g[t] (the grouped weight gradient)."""
    dw = jnp.zeros((num_experts, x_PxD.shape[1], g_PxF.shape[1]), jnp.float32)

    bf16 = x_PxD.dtype == g_PxF.dtype == jnp.bfloat16
    if bf16:
        # Every tile's x^T, transposed once for all tiles ([Nt, D, R], row-major): the tile
        # product then runs on the bf16 kernels (dot_f32) without a copy per tile. Otherwise
        # XLA:CPU upcasts the whole x and g to float32 and runs float32 dots (the bench
        # model's MoE experts, fwd + bwd: -23% with the weight transpose in _gmm_fwd_impl).
        P, D = x_PxD.shape
        xT_NtxDxR = row_major(jnp.swapaxes(x_PxD.reshape(P // rows, rows, D), 1, 2))

    def body(t, dw):
        gt_RxF = jax.lax.dynamic_slice_in_dim(g_PxF, t * rows, rows)
        e = tile_expert_Nt[t]
        acc = jax.lax.dynamic_index_in_dim(dw, e, keepdims=True)
        if bf16:
            upd = dot_f32(jax.lax.dynamic_index_in_dim(xT_NtxDxR, t, keepdims=False), gt_RxF)
        else:
            xt_RxD = jax.lax.dynamic_slice_in_dim(x_PxD, t * rows, rows)
            upd = jnp.einsum("rd,rf->df", xt_RxD, gt_RxF, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw, acc + upd[None], e, 0)

    return cast(_tile_loop(n_used, body, dw, x_PxD, g_PxF, tile_expert_Nt, n_used), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gmm(x_PxD, w_ExDxF, tile_expert_Nt, n_used, rows: int):
    """Grouped matmul over an expert-aligned tile layout (see `tile_layout`): [P, D] -> [P, F].

    Rows of tiles >= n_used come out zero. custom_vjp: the loop has a data-dependent trip
    count, which reverse-mode autodiff cannot transpose; its gradient is two more loops.
    """
    return _gmm_fwd_impl(x_PxD, w_ExDxF, tile_expert_Nt, n_used, rows, False)


def _gmm_fwd(x_PxD, w_ExDxF, tile_expert_Nt, n_used, rows):
    return gmm(x_PxD, w_ExDxF, tile_expert_Nt, n_used, rows), (x_PxD, w_ExDxF, tile_expert_Nt, n_used)


def _gmm_bwd(rows, res, g_PxF):
    x_PxD, w_ExDxF, tile_expert_Nt, n_used = res
    dx = _gmm_fwd_impl(g_PxF, w_ExDxF, tile_expert_Nt, n_used, rows, True)
    dw = _tgmm(x_PxD, g_PxF, tile_expert_Nt, n_used, rows, w_ExDxF.shape[0], w_ExDxF.dtype)
    return _sum_to_primal(dx, x_PxD), _sum_to_primal(dw, w_ExDxF), None, None


def _sum_to_primal(ct, primal):
    # Inside shard_map, an operand replicated over some mesh axes (weights under pure data
    # parallelism) gets the sum of every device's contribution, as autodiff would give it.
    extra = _varying(ct) - _varying(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute_rows(x_SxD, fwd_idx_P, bwd_idx_Q, k: int):
    """y[p] = x[fwd_idx[p]] (0 for an out-of-range index), with a gather, not a scatter, as VJP.

    The caller guarantees the inverse map: row s of x feeds exactly the rows
    bwd_idx[s * k : (s + 1) * k] of y (out-of-range entries: none), so the gradient is
    dx[s] = sum_j dy[bwd_idx[s * k + j]]. XLA:CPU runs a scatter-add (autodiff's transpose
    of a gather) several times slower than a gather.
    """
    return jnp.take(x_SxD, fwd_idx_P, axis=0, mode="fill", fill_value=0)


def _permute_rows_fwd(x_SxD, fwd_idx_P, bwd_idx_Q, k):
    return permute_rows(x_SxD, fwd_idx_P, bwd_idx_Q, k), (fwd_idx_P, bwd_idx_Q, x_SxD.shape[0])


def _permute_rows_bwd(k, res, g_PxD):
    fwd_idx_P, bwd_idx_Q, S = res
    dx = jnp.take(g_PxD, bwd_idx_Q, axis=0, mode="fill", fill_value=0).reshape(S, k, -1).sum(1)
    return dx, None, None  # x is never less varying than g here: both are per-device data


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def grouped_ffn_tiled(x_SxD, copies_per_row: int, ids_M, valid_M, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    """SwiGLU of each copy through its expert, block-sparse (exact; drops nothing)."""
    M, S = ids_M.shape[0], x_SxD.shape[0]
    E = w_gate_ExDxF.shape[0]
    R = dropless_tile_rows(M, E)
    Nt = -(-M // R) + E  # sum_e ceil(c_e / R) <= M / R + E for any counts c_e
    row_M, tile_expert_Nt, n_used = tile_layout(ids_M, valid_M, E, R, Nt)
    # The copy held by each padded row (M = none). Padded rows read x directly (no [M, D]
    # copy buffer); padding rows read an out-of-range index and get zeros.
    copy_P = jnp.full((Nt * R,), M, jnp.int32).at[row_M].set(jnp.arange(M, dtype=jnp.int32), mode="drop")
    token_P = jnp.where(copy_P < M, copy_P // copies_per_row, S)
    xs_PxD = permute_rows(x_SxD, token_P, row_M, copies_per_row)
    h = (jax.nn.silu(gmm(xs_PxD, w_gate_ExDxF, tile_expert_Nt, n_used, R))
         * gmm(xs_PxD, w_up_ExDxF, tile_expert_Nt, n_used, R))
    ys_PxD = gmm(h, w_down_ExFxD, tile_expert_Nt, n_used, R)
    return permute_rows(ys_PxD, row_M, copy_P, 1)


def grouped_ffn_ragged(x_SxD, copies_per_row: int, ids_M, valid_M, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    """The same with `jax.lax.ragged_dot`; invalid copies sort last, beyond every group."""
    E = w_gate_ExDxF.shape[0]
    bucket_M = jnp.where(valid_M, ids_M, E)
    order_M = jnp.argsort(bucket_M, stable=True)
    group_sizes_E = jnp.bincount(bucket_M, length=E + 1)[:E].astype(jnp.int32)
    xs_MxD = jnp.where(valid_M[order_M, None], x_SxD[order_M // copies_per_row], 0)
    h = (jax.nn.silu(jax.lax.ragged_dot(xs_MxD, w_gate_ExDxF, group_sizes_E))
         * jax.lax.ragged_dot(xs_MxD, w_up_ExDxF, group_sizes_E))
    ys_MxD = jax.lax.ragged_dot(h, w_down_ExFxD, group_sizes_E)
    ys_MxD = jnp.where(valid_M[order_M, None], ys_MxD, 0)
    return jnp.zeros_like(ys_MxD).at[order_M].set(ys_MxD)


def grouped_ffn(x_SxD, copies_per_row: int, ids_M, valid_M, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                impl: Optional[str] = None):
    """y[m] = SwiGLU_{ids[m]}(x[m // copies_per_row]) for each copy m: [M, D].

    M = S * copies_per_row (copy m of row s is m = s * copies_per_row + j); copies with
    valid_M False give zero rows.
    """
    fn = {"tiled": grouped_ffn_tiled, "ragged": grouped_ffn_ragged,
          "tokamax": gpu_kernels.grouped_ffn_tokamax}[impl or grouped_impl()]
    return fn(x_SxD, copies_per_row, ids_M, valid_M, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def expert_ffn_dropless(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK,
                        impl: Optional[str] = None):
    """Every token copy through its expert; nothing dropped."""
    N, K = ids_NxK.shape
    y_MxD = grouped_ffn(x_NxD, K, ids_NxK.reshape(-1), jnp.ones((N * K,), bool),
                        w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, impl)
    return combine(y_MxD, weights_NxK), jnp.zeros((), jnp.int32)


# ----- capacity: a compute budget, overflowing copies dropped -------------------------------------

CAPACITY_POLICIES = ("affinity", "gshard")


def expert_capacity(num_tokens: int, c: ModelConfig) -> int:
    """GShard: C = ceil(N K / E * capacity_factor) slots per expert for N tokens."""
    return max(1, math.ceil(num_tokens * c.num_experts_per_tok / c.n_routed_experts * c.capacity_factor))


def device_budget(num_tokens: int, c: ModelConfig) -> int:
    """DeepSeek-V2 §2.2.4: copies one device computes, ceil(N K * capacity_factor).

    N is the tokens each device of the expert group contributes: the group routes N K * P
    copies over its P devices, N K on average, so capacity factor 1.0 is the average load.
    """
    return max(1, math.ceil(num_tokens * c.num_experts_per_tok * c.capacity_factor))


def capacity_slots(ids_NxK: jax.Array, num_experts: int, capacity: int):
    """(dest_M, keep_M) in k-major copy order m = k * N + n: each copy's slot e * C + rank."""
    ids_M = ids_NxK.T.reshape(-1)
    # Priority: all first choices before any second choice (GShard / Switch), then token order.
    onehot_MxE = jax.nn.one_hot(ids_M, num_experts, dtype=jnp.int32)
    slot_M = (jnp.cumsum(onehot_MxE, axis=0) * onehot_MxE).sum(-1) - 1
    keep_M = slot_M < capacity
    return jnp.where(keep_M, ids_M * capacity + slot_M, num_experts * capacity), keep_M


def expert_ffn_capacity(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK, capacity,
                        valid_NxK=None):
    """GShard dispatch: each expert takes at most `capacity` copies, in token order (k-major).

    Returns (y, dropped): dropped counts the copies of valid tokens (`valid_NxK`, default all).
    """
    N, K = ids_NxK.shape
    E, D = w_gate_ExDxF.shape[0], x_NxD.shape[1]
    dest_M, keep_M = capacity_slots(ids_NxK, E, capacity)
    token_M = jnp.tile(jnp.arange(N), K)
    buf = jnp.zeros((E * capacity, D), x_NxD.dtype).at[dest_M].set(x_NxD[token_M], mode="drop")
    ye = swiglu(buf.reshape(E, capacity, D), w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                "ecd,edf->ecf", "ecf,efd->ecd").reshape(E * capacity, D)
    y_KxNxD = jnp.take(ye, dest_M, axis=0, mode="fill", fill_value=0).reshape(K, N, D)
    out = jnp.einsum("knd,nk->nd", y_KxNxD, weights_NxK.astype(y_KxNxD.dtype))
    valid_M = jnp.ones_like(keep_M) if valid_NxK is None else valid_NxK.T.reshape(-1)
    return out, (~keep_M & valid_M).sum().astype(jnp.int32)


# Priorities at or above this mark protected copies (affinities are in [0, 1]; moe.copy_priority).
PROTECTED_PRIORITY = 2.0


def affinity_keep(priority_M: jax.Array, dest_M: jax.Array, num_dests: int, budget: int) -> jax.Array:
    """keep_M: per destination device, its `budget` copies of highest priority, plus every
    protected copy (priority >= PROTECTED_PRIORITY).

    DeepSeek-V2 §2.2.4 drops the lowest-affinity copies on each device until its budget
    holds, and never drops the tokens of ~10% of the sequences: protected copies rank first
    and so use the budget first; if they alone exceed it they are all kept anyway. Ties keep
    the lower copy index m. Copies with negative priority (padding) are never kept: they
    come last and their outputs are unused.
    """
    M = priority_M.shape[0]
    by_priority_M = jnp.argsort(-priority_M, stable=True)
    order_M = by_priority_M[jnp.argsort(dest_M[by_priority_M], stable=True)]  # by device, then priority
    counts_P = jnp.bincount(dest_M, length=num_dests)
    start_P = jnp.cumsum(counts_P) - counts_P
    rank_sorted_M = jnp.arange(M, dtype=jnp.int32) - start_P[dest_M[order_M]]
    rank_M = jnp.zeros((M,), jnp.int32).at[order_M].set(rank_sorted_M.astype(jnp.int32))
    return ((rank_M < budget) | (priority_M >= PROTECTED_PRIORITY)) & (priority_M >= 0)


def expert_ffn_affinity(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK, priority_NxK,
                        budget: int, impl: Optional[str] = None):
    """DeepSeek-V2 token dropping on one device holding every expert: the `budget` copies of
    highest priority go through their experts (grouped matmul), the rest are dropped.

    priority_NxK: the copy's affinity score (higher kept first; see `moe.copy_priority`).
    Returns (y, dropped copies of valid tokens).
    """
    N, K = ids_NxK.shape
    priority_M = jax.lax.stop_gradient(priority_NxK).reshape(-1)  # copy m = n * K + k
    keep_M = affinity_keep(priority_M, jnp.zeros((N * K,), jnp.int32), 1, budget)
    y_MxD = grouped_ffn(x_NxD, K, ids_NxK.reshape(-1), keep_M, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, impl)
    return combine(y_MxD, weights_NxK), (~keep_M & (priority_M >= 0)).sum().astype(jnp.int32)


def expert_ffn(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK, c: ModelConfig,
               priority_NxK: Optional[jax.Array] = None):
    """The routed experts on local tokens with the backend `c.moe_dispatch` -> (y, dropped).

    priority_NxK: capacity dispatch's keep order (negative = padding, never counted as
    dropped); None = every copy valid, equal priority.
    """
    args = (x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK)
    if c.moe_dispatch == "dense":
        return expert_ffn_dense(*args)
    if c.moe_dispatch == "capacity":
        N = x_NxD.shape[0]
        priority_NxK = jnp.zeros(ids_NxK.shape, jnp.float32) if priority_NxK is None else priority_NxK
        if c.capacity_policy == "affinity":
            return expert_ffn_affinity(*args, priority_NxK, device_budget(N, c))
        return expert_ffn_capacity(*args, expert_capacity(N, c), valid_NxK=priority_NxK >= 0)
    return expert_ffn_dropless(*args)
