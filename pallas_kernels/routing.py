"""DeepSeek MoE routing: scores, selection-only bias, group limit, top-k, renormalise, scale.

Dimension legend: T tokens, E routed experts, G expert groups, S experts per group (E / G),
K experts per token, B tokens in one kernel block. A trailing `p` marks a size padded to a
power of two (Ep, Kp) or to a multiple of the block (Tp).

Semantics (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2, eq. 12-16):
    s      = softmax(logits) (V2) or sigmoid(logits) (V3)                      [T, E]
    choice = s + bias            (bias only steers SELECTION, never the weights)
    group score = max(choice in group) (V2) or sum of its top-2 (V3)            [T, G]
    keep the top `topk_groups` groups, mask the others with -inf, then top-K experts
    weights = s[selected] (un-biased), renormalised over the K when `norm_topk`,
                        then multiplied by `scale` (routed_scaling_factor).
All math is float32: a bf16 bias flips near-tied selections (REFERENCES.md pitfall 2).
Ties are broken like `jax.lax.top_k`: the lowest index wins, in the kernel too.

The kernel (`route`) does all of it in one pass over a block of B tokens, with no sort:
group scores by masked row maxima, the group limit by counting, for each group, how many
groups beat it (G is at most a few dozen), and the top-K as K rounds of
"row argmax (the lowest index of the max), then mask it out" (K <= 16 in practice).
The backward pass is plain jnp from (logits, expert_ids): selection is piecewise
constant, so the gradient flows only through the score function of the selected
experts and the renormalisation.

Backend choice (JAX 0.10.2, checked in this venv's jax/_src/pallas/ and by lowering the
kernels for the "cuda" platform on a CPU machine):
- With no compiler params, `pallas_call` on GPU goes to Mosaic GPU
  (`jax_pallas_use_mosaic_gpu` defaults to True), and warns that `pallas_call` for Mosaic
  GPU is deprecated in favour of `plgpu.kernel`.
- A generic kernel does not lower there: `ref[...]` loads a strided layout whose
  reductions must cover all axes ("No support for axes yet"), so every per-row
  max / min / sum of this kernel fails; row-wise reductions need Mosaic-specific tiled
  layouts (`plgpu.layout_cast`, `plgpu.load(..., layout=...)`), and Mosaic GPU has no
  gather, which `permute.py` needs.
- The Triton lowering accepts the same generic body (row reductions, iota, where,
  indexed-ref gathers) and is what JAX 0.10's own `ops/gpu` kernels use, so we pass
  `pallas.triton.CompilerParams` explicitly. It requires power-of-two array shapes:
  the wrapper pads E and K to powers of two and T to a multiple of the block.
- JAX 0.12 still has the Triton lowering (deprecated, with a warning) and runs these
  kernels unchanged on a GPU; lowering them for "cuda" on a CPU machine needs the target
  GPU named (`pallas_kernels.cross_lowering.as_gpu`). The supported range is JAX 0.10-0.12
  (tested on both). When JAX removes Triton, port the body to `plgpu.kernel` with explicit
  layouts behind the same `route` signature; the reference and tests stay as they are.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
_NORM_EPS = 1e-20  # the same epsilon as route_reference, so weights match bit for bit


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Launch shape of the routing kernel.

    block_t: tokens per program, a power of two (Triton). 16 tokens x 256 experts is
        4,096 float32 per live array, 32 registers per thread at 4 warps, which aims to
        keep the unrolled top-K rounds in registers; not yet measured on a GPU: sweep it
        with `experiments/benchmarks/gpu_routing.py --block_ts 8,16,32`.
    num_warps: Triton warps per program.
    """

    block_t: int = 16
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_t", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name}={value}; it must be a power of two >= 1")


@dataclasses.dataclass(frozen=True)
class _RouteConfig:
    """Every static argument of `route`, hashable so it can be a custom_vjp nondiff arg."""

    top_k: int
    n_groups: int
    topk_groups: int
    score_func: str
    group_score: str
    norm_topk: bool
    scale: float
    interpret: bool
    block_sizes: BlockSizes


# ----------------------------------------------------------------------------- kernel


def _row_argmax(vals_BxE, allowed_BxE, col_BxE):
    """(max, index of the first max) over the allowed entries of each row, both [B, 1].

    The lowest index wins exact ties, as in `jax.lax.top_k`. A -inf entry that is still
    allowed can win (when every allowed entry is -inf), again as in `lax.top_k`.

    The index comes from one argmax reduction (value and index together), not from
    "max, then the columns equal to it": a compiler may compute the masked values twice,
    once per use, and an ulp apart (XLA:CPU's legacy emitters in interpret mode did, and no
    column then equalled the max).
    """
    cand_BxE = jnp.where(allowed_BxE, vals_BxE, -jnp.inf)
    best_Bx1 = jnp.max(cand_BxE, axis=1, keepdims=True)
    idx_Bx1 = jnp.argmax(cand_BxE, axis=1, keepdims=True).astype(jnp.int32)
    # All allowed entries -inf: argmax's first -inf may be a disallowed column; take the first allowed.
    sentinel = vals_BxE.shape[1]  # larger than any column, loses every min
    first_allowed_Bx1 = jnp.min(jnp.where(allowed_BxE, col_BxE, sentinel), axis=1, keepdims=True)
    idx_Bx1 = jnp.where(best_Bx1 == -jnp.inf, first_allowed_Bx1, idx_Bx1)
    return best_Bx1, idx_Bx1


def _group_keep(choice_BxE, col_BxE, cfg: _RouteConfig, group_size: int):
    """Boolean [B, E]: experts in the `topk_groups` best groups (V3 eq. 16's node limit).

    Group g is kept when fewer than `topk_groups` groups beat it, where h beats g if its
    score is larger, or equal with h < g: exactly `lax.top_k`'s order over groups.
    """
    members, scores_Bx1 = [], []
    for g in range(cfg.n_groups):
        member_BxE = (col_BxE >= g * group_size) & (col_BxE < (g + 1) * group_size)
        best_Bx1, first_Bx1 = _row_argmax(choice_BxE, member_BxE, col_BxE)
        if cfg.group_score == "top2_sum":
            second_Bx1, _ = _row_argmax(choice_BxE, member_BxE & (col_BxE != first_Bx1), col_BxE)
            best_Bx1 = best_Bx1 + second_Bx1
        members.append(member_BxE)
        scores_Bx1.append(best_Bx1)
    keep_BxE = jnp.zeros(choice_BxE.shape, dtype=jnp.bool_)
    for g in range(cfg.n_groups):
        beaten_by_Bx1 = jnp.zeros(scores_Bx1[g].shape, dtype=jnp.int32)
        for h in range(cfg.n_groups):
            if h == g:
                continue
            # A lower-index group wins a tie, so it beats g when >=, a higher one only when >.
            beats = scores_Bx1[h] >= scores_Bx1[g] if h < g else scores_Bx1[h] > scores_Bx1[g]
            beaten_by_Bx1 = beaten_by_Bx1 + beats.astype(jnp.int32)
        keep_BxE = keep_BxE | (members[g] & (beaten_by_Bx1 < cfg.topk_groups))
    return keep_BxE


def _route_kernel(logits_ref, bias_ref, weights_ref, ids_ref, *, cfg: _RouteConfig, num_experts: int):
    """One block of B tokens: scores, bias, group limit, K argmax rounds, renormalise, scale."""
    x_BxE = logits_ref[...].astype(jnp.float32)
    col_BxE = jax.lax.broadcasted_iota(jnp.int32, x_BxE.shape, 1)
    real_BxE = col_BxE < num_experts  # columns past E are power-of-two padding
    if cfg.score_func == "softmax":
        x_BxE = jnp.where(real_BxE, x_BxE, -jnp.inf)
        e_BxE = jnp.exp(x_BxE - jnp.max(x_BxE, axis=1, keepdims=True))
        s_BxE = e_BxE / jnp.sum(e_BxE, axis=1, keepdims=True)
    else:
        s_BxE = jnp.where(real_BxE, jax.nn.sigmoid(x_BxE), 0.0)
    choice_BxE = s_BxE + bias_ref[...]
    if cfg.n_groups > 1 and cfg.topk_groups < cfg.n_groups:
        keep_BxE = _group_keep(choice_BxE, col_BxE, cfg, num_experts // cfg.n_groups)
        # -inf, not a large negative number: masked experts never outrank kept ones.
        choice_BxE = jnp.where(keep_BxE, choice_BxE, -jnp.inf)

    kcol_BxKp = jax.lax.broadcasted_iota(jnp.int32, weights_ref.shape, 1)
    w_BxKp = jnp.zeros(weights_ref.shape, jnp.float32)
    ids_BxKp = jnp.zeros(ids_ref.shape, jnp.int32)
    taken_BxE = ~real_BxE  # padding is never selectable, not even as a -inf tie
    for k in range(cfg.top_k):
        _, idx_Bx1 = _row_argmax(choice_BxE, ~taken_BxE, col_BxE)
        hit_BxE = col_BxE == idx_Bx1
        # Gate from the un-biased score s (V3 eq. 13), never from `choice`.
        w_Bx1 = jnp.sum(jnp.where(hit_BxE, s_BxE, 0.0), axis=1, keepdims=True)
        taken_BxE = taken_BxE | hit_BxE
        w_BxKp = jnp.where(kcol_BxKp == k, w_Bx1, w_BxKp)
        ids_BxKp = jnp.where(kcol_BxKp == k, idx_Bx1, ids_BxKp)
    if cfg.norm_topk:
        w_BxKp = w_BxKp / (jnp.sum(w_BxKp, axis=1, keepdims=True) + _NORM_EPS)
    weights_ref[...] = w_BxKp * cfg.scale
    ids_ref[...] = ids_BxKp


def _route_pallas(logits_TxE, bias_E, cfg: _RouteConfig):
    """Pads T to the block and E, K to powers of two, launches one program per block."""
    T, E = logits_TxE.shape
    block_t = cfg.block_sizes.block_t
    Tp, Ep, Kp = pl.cdiv(T, block_t) * block_t, pl.next_power_of_2(E), pl.next_power_of_2(cfg.top_k)
    if (Tp, Ep) != (T, E):
        logits_TxE = jnp.pad(logits_TxE, ((0, Tp - T), (0, Ep - E)))
    bias_1xEp = jnp.pad(bias_E.astype(jnp.float32), (0, Ep - E))[None, :]
    kernel = functools.partial(_route_kernel, cfg=cfg, num_experts=E)
    out_spec = pl.BlockSpec((block_t, Kp), lambda i: (i, 0))
    w_TpxKp, ids_TpxKp = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((Tp, Kp), jnp.float32), jax.ShapeDtypeStruct((Tp, Kp), jnp.int32)),
        grid=(Tp // block_t,),
        in_specs=[pl.BlockSpec((block_t, Ep), lambda i: (i, 0)), pl.BlockSpec((1, Ep), lambda i: (0, 0))],
        out_specs=(out_spec, out_spec),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.block_sizes.num_warps, num_stages=1),
        interpret=cfg.interpret,
        name="moe_route",
    )(logits_TxE, bias_1xEp)
    return w_TpxKp[:T, :cfg.top_k], ids_TpxKp[:T, :cfg.top_k]


# ------------------------------------------------------------------ custom_vjp wrapper


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _route(logits_TxE, bias_E, cfg: _RouteConfig):
    return _route_pallas(logits_TxE, bias_E, cfg)


def _route_fwd(logits_TxE, bias_E, cfg: _RouteConfig):
    w_TxK, ids_TxK = _route_pallas(logits_TxE, bias_E, cfg)
    return (w_TxK, ids_TxK), (logits_TxE, bias_E, ids_TxK)


def _route_bwd(cfg: _RouteConfig, residuals, cotangents):
    """d(weights)/d(logits) for fixed expert_ids; the bias only selects, so its gradient is 0.

    With u = s[selected] and D = sum(u) + eps, w = scale * u / D (or scale * u), so
    dL/du = scale * (g / D - (g . u) / D^2); then back through sigmoid (s (1 - s)) or
    softmax (s * (ds - <ds, s>)) of V3 eq. 15 / V2 eq. 10.
    """
    logits_TxE, bias_E, ids_TxK = residuals
    g_TxK = cotangents[0].astype(jnp.float32) * cfg.scale
    s_TxE = scores_from_logits(logits_TxE, cfg.score_func)
    if cfg.norm_topk:
        u_TxK = jnp.take_along_axis(s_TxE, ids_TxK, axis=-1)
        denom_Tx1 = u_TxK.sum(axis=-1, keepdims=True) + _NORM_EPS
        g_TxK = g_TxK / denom_Tx1 - (g_TxK * u_TxK).sum(axis=-1, keepdims=True) / denom_Tx1**2
    rows_Tx1 = jnp.arange(s_TxE.shape[0])[:, None]
    ds_TxE = jnp.zeros_like(s_TxE).at[rows_Tx1, ids_TxK].add(g_TxK)
    if cfg.score_func == "sigmoid":
        dlogits_TxE = ds_TxE * s_TxE * (1.0 - s_TxE)
    else:
        dlogits_TxE = s_TxE * (ds_TxE - (ds_TxE * s_TxE).sum(axis=-1, keepdims=True))
    return dlogits_TxE.astype(logits_TxE.dtype), jnp.zeros_like(bias_E)


_route.defvjp(_route_fwd, _route_bwd)


def _check_args(logits_TxE, bias, cfg: _RouteConfig):
    if logits_TxE.ndim != 2:
        raise ValueError(f"logits must be [T, E]; got shape {logits_TxE.shape}. Flatten batch and time first.")
    E = logits_TxE.shape[1]
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"bias must be [E]=({E},); got shape {bias.shape}")
    if cfg.score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func={cfg.score_func!r}; expected one of {SCORE_FUNCS}")
    if cfg.group_score not in GROUP_SCORES:
        raise ValueError(f"group_score={cfg.group_score!r}; expected one of {GROUP_SCORES}")
    if not 1 <= cfg.top_k <= E:
        raise ValueError(f"top_k={cfg.top_k} must be in [1, E={E}]")
    if cfg.n_groups <= 1 or cfg.topk_groups >= cfg.n_groups:
        return  # no group limit, exactly as in route_reference
    if E % cfg.n_groups:
        raise ValueError(f"n_groups={cfg.n_groups} must divide E={E}")
    if cfg.topk_groups < 1:
        raise ValueError(f"topk_groups={cfg.topk_groups} must be >= 1 when n_groups={cfg.n_groups} > 1")
    if cfg.group_score == "top2_sum" and E // cfg.n_groups < 2:
        raise ValueError(f"group_score='top2_sum' needs >= 2 experts per group; E={E}, n_groups={cfg.n_groups}")


@functools.partial(jax.jit, static_argnames=("top_k", "n_groups", "topk_groups", "score_func", "group_score",
                                             "norm_topk", "scale", "interpret", "block_sizes"))
def route(logits, bias=None, *, top_k, n_groups=1, topk_groups=1, score_func="softmax", group_score="max",
          norm_topk=False, scale=1.0, interpret=False, block_sizes=None):
    """Pallas routing. logits [T, E], bias [E] or None -> (weights [T, K] f32, expert_ids [T, K] i32).

    Same signature and results as `route_reference` (V2 eq. 9-11, V3 eq. 12-16), with a
    custom_vjp for d(weights)/d(logits). `interpret=True` runs the kernel on CPU.
    """
    cfg = _RouteConfig(top_k=top_k, n_groups=n_groups, topk_groups=topk_groups, score_func=score_func,
                       group_score=group_score, norm_topk=bool(norm_topk), scale=float(scale),
                       interpret=interpret, block_sizes=block_sizes or BlockSizes())
    _check_args(logits, bias, cfg)
    bias_E = jnp.zeros((logits.shape[1],), jnp.float32) if bias is None else bias.astype(jnp.float32)
    return _route(logits, bias_E, cfg)


# -------------------------------------------------------------------- jnp reference


def scores_from_logits(logits_TxE: jax.Array, score_func: str) -> jax.Array:
    """Router affinities s_{i,t} in float32 (V2 eq. 10 softmax, V3 eq. 15 sigmoid)."""
    logits_TxE = logits_TxE.astype(jnp.float32)
    if score_func == "softmax":
        return jax.nn.softmax(logits_TxE, axis=-1)
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits_TxE)
    raise ValueError(f"score_func={score_func!r}; expected one of {SCORE_FUNCS}")


def group_mask(choice_TxE: jax.Array, n_groups: int, topk_groups: int, group_score: str) -> jax.Array:
    """Boolean [T, E]: True for experts inside the `topk_groups` best groups of each token."""
    T, E = choice_TxE.shape
    if n_groups <= 1 or topk_groups >= n_groups:
        return jnp.ones((T, E), dtype=bool)
    grouped_TxGxS = choice_TxE.reshape(T, n_groups, E // n_groups)
    if group_score == "max":
        gscore_TxG = grouped_TxGxS.max(axis=-1)
    elif group_score == "top2_sum":
        gscore_TxG = jax.lax.top_k(grouped_TxGxS, 2)[0].sum(axis=-1)
    else:
        raise ValueError(f"group_score={group_score!r}; expected one of {GROUP_SCORES}")
    _, top_groups_TxM = jax.lax.top_k(gscore_TxG, topk_groups)
    keep_TxG = jnp.zeros((T, n_groups), dtype=bool).at[jnp.arange(T)[:, None], top_groups_TxM].set(True)
    return jnp.repeat(keep_TxG, E // n_groups, axis=1)


def route_reference(logits, bias=None, *, top_k, n_groups=1, topk_groups=1, score_func="softmax",
                    group_score="max", norm_topk=False, scale=1.0, interpret=False):
    """Pure-jnp routing. logits [T, E], bias [E] or None -> (weights [T, K] f32, expert_ids [T, K] i32).

    `interpret` is accepted (and ignored) so the reference and the kernel share one signature.
    """
    del interpret
    s_TxE = scores_from_logits(logits, score_func)
    choice_TxE = s_TxE if bias is None else s_TxE + bias.astype(jnp.float32)[None, :]
    keep_TxE = group_mask(choice_TxE, n_groups, topk_groups, group_score)
    # -inf, not a large negative number: masked experts can never win (pitfall 3).
    choice_TxE = jnp.where(keep_TxE, choice_TxE, -jnp.inf)
    _, ids_TxK = jax.lax.top_k(choice_TxE, top_k)
    w_TxK = jnp.take_along_axis(s_TxE, ids_TxK, axis=-1)
    if norm_topk:
        w_TxK = w_TxK / (w_TxK.sum(axis=-1, keepdims=True) + _NORM_EPS)
    return w_TxK * scale, ids_TxK.astype(jnp.int32)
