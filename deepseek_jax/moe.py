"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V2 §2.2, V3 §2.1.2).

Dimension legend: B batch, T time, D model width, F expert width (moe_intermediate_size),
E routed experts, K experts per token, N = B*T tokens, G expert groups, L MoE layers.

  out = x_shared(x) + sum_{k<K} w_k * Expert_{id_k}(x)
Routing (scores, selection-only bias, group limit, top-k, renormalise, scale) is
`pallas_kernels.routing.route_reference` (or its Pallas kernel); router math is float32.
The routed experts run through `expert_parallel.routed_experts`: inside `jax.shard_map`
with all-to-all when the mesh has an `expert` axis > 1, else locally with a dispatch
backend of dispatch.py (dense | dropless | capacity). Imports go one way:
moe.py -> expert_parallel.py -> dispatch.py. The dispatch names below are re-exported
for callers that knew them here.
"""
from __future__ import annotations

import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import dispatch, expert_parallel, gpu_kernels
from deepseek_jax import layer_stack
from deepseek_jax.config import ModelConfig
from deepseek_jax.dispatch import (  # noqa: F401  (re-exported)
    dropless_tile_rows, expert_capacity, expert_ffn, expert_ffn_capacity, expert_ffn_dense,
    expert_ffn_dropless, gmm, grouped_ffn, grouped_impl, permute_rows, tile_layout)
from deepseek_jax.layers import MLP, cast, constrain, param_with_axes
from deepseek_jax.outputs import MoEStats
from pallas_kernels import routing as routing_lib


def routing_args(c: ModelConfig) -> dict:
    """Keyword arguments of `pallas_kernels.routing.route` for this config.

    The kernel renormalises when `norm_topk` and then multiplies by `scale`; DeepSeek's
    released code decides both from the config (REFERENCES.md):
      V3 (sigmoid): renormalise over the K when top_k > 1 and norm_topk_prob, THEN scale.
      V2 (softmax): renormalise when top_k > 1 and norm_topk_prob, ELSE scale (never both).
    """
    K = c.num_experts_per_tok
    norm = bool(c.norm_topk_prob and K > 1)
    scale = 1.0 if (norm and c.scoring_func == "softmax") else c.routed_scaling_factor
    return dict(top_k=K, n_groups=c.n_group, topk_groups=c.topk_group, score_func=c.scoring_func,
                group_score=c.group_score, norm_topk=norm, scale=scale)


def route(logits_NxE: jax.Array, bias_E: Optional[jax.Array], c: ModelConfig,
          forced_ids_NxK: Optional[jax.Array] = None):
    """Dispatch to the routing implementation named by `config.routing_impl`.

    forced_ids_NxK (router replay, grpo.router_replay): a token whose K ids are all >= 0 goes
    to those experts, its gates recomputed from THESE logits (`forced_gates`); a row of -1
    routes normally.
    """
    impl = c.routing_impl
    on_gpu = gpu_kernels.target_platform() == "gpu"  # a CPU host lowering for "cuda" too
    if impl == "auto":
        impl = "pallas" if on_gpu else "xla"
    kwargs = routing_args(c)
    if impl == "pallas":
        kernel = lambda lg, *b: routing_lib.route(lg, *(b or (None,)), interpret=not on_gpu, **kwargs)
    else:
        kernel = lambda lg, *b: routing_lib.route_reference(lg, *(b or (None,)), **kwargs)
    # Per device on its own tokens: plain jit would all-gather the step's tokens for TopK.
    shared = () if bias_E is None else (bias_E,)
    weights_NxK, ids_NxK = expert_parallel.per_device(kernel, (logits_NxE,), shared)
    if forced_ids_NxK is None:
        return weights_NxK, ids_NxK
    forced_N = jnp.all(forced_ids_NxK >= 0, axis=-1)
    ids_NxK = jnp.where(forced_N[:, None], forced_ids_NxK.astype(jnp.int32), ids_NxK)
    weights_NxK = jnp.where(forced_N[:, None], forced_gates(logits_NxE, ids_NxK, c), weights_NxK)
    return weights_NxK, ids_NxK


def forced_gates(logits_NxE: jax.Array, ids_NxK: jax.Array, c: ModelConfig) -> jax.Array:
    """[N, K] float32 gates of GIVEN experts from the current router logits: what routing gives
    when it selects them. The un-biased scores s (softmax or sigmoid over all E; the bias only
    selects), renormalised over the K and scaled exactly as `routing_args` says (V3: renormalise
    then scale; V2: renormalise or scale). Differentiable: the router learns through the gates
    of the replayed experts."""
    a = routing_args(c)
    w_NxK = jnp.take_along_axis(routing_lib.scores_from_logits(logits_NxE, c.scoring_func), ids_NxK, axis=-1)
    if a["norm_topk"]:
        w_NxK = w_NxK / (w_NxK.sum(axis=-1, keepdims=True) + routing_lib._NORM_EPS)
    return w_NxK * a["scale"]


def protected_rows(B: int, fraction: float) -> np.ndarray:
    """[B] bool: the rows capacity dispatch never drops (DeepSeek-V2 §2.2.4: ~10% of sequences).

    Row b is protected when floor((b + 1) f) > floor(b f): every (1/f)-th row of each batch,
    floor(B f) rows in all. A deterministic choice by row index; the data pipeline shuffles,
    so over training it protects a random ~f of the sequences. Static: B is known at trace time.
    """
    b = np.arange(B, dtype=np.float64)
    return np.floor((b + 1) * fraction + 1e-9) > np.floor(b * fraction + 1e-9)


def copy_priority(scores_NxE, ids_NxK, valid_BxT, B: int, T: int, c: ModelConfig) -> jax.Array:
    """[N, K] float32 keep order of each routed copy for capacity dispatch (higher kept first).

    The copy's affinity score s_{i,t} in [0, 1] (un-biased softmax / sigmoid score); plus
    dispatch.PROTECTED_PRIORITY for protected rows (never dropped); -1 for padding tokens
    (dropped first, never counted).
    """
    aff_NxK = jnp.take_along_axis(scores_NxE, ids_NxK, axis=-1)
    prot_N = jnp.asarray(np.repeat(protected_rows(B, c.capacity_protected_fraction), T))
    pri_NxK = aff_NxK + dispatch.PROTECTED_PRIORITY * prot_N[:, None]
    if valid_BxT is not None:
        pri_NxK = jnp.where(valid_BxT.reshape(-1, 1) != 0, pri_NxK, -1.0)  # segment ids or a mask
    return jax.lax.stop_gradient(pri_NxK.astype(jnp.float32))


class MoE(nn.Module):
    """Router + routed experts + shared experts. Returns (y [B, T, D], per-row statistics)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, valid_BxT: Optional[jax.Array] = None,
                 forced_ids_BxTxK: Optional[jax.Array] = None):
        """forced_ids_BxTxK: router replay (`route`); -1 rows route normally. The stats'
        `expert_ids` [B, T, K] are the experts each token went to (what a sampler records)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        B, T, D = x_BxTxD.shape
        E, F = c.n_routed_experts, c.moe_intermediate_size
        # Tokens stay split over every batch-like mesh axis (data, fsdp, expert) into the
        # per-device routing, statistics and expert shard_maps (no reshuffle at their borders).
        x_NxD = constrain(x_BxTxD.reshape(B * T, D), ("batch", None))

        router_DxE = param_with_axes(self, "router", (D, E), ("embed", None))
        bias_E = None
        if c.router_bias:
            # Not trained by gradients: the aux-loss-free rule updates it (V3 eq. 16).
            bias_E = jax.lax.stop_gradient(
                param_with_axes(self, "e_score_correction_bias", (E,), (None,), nn.initializers.zeros))
        logits_NxE = jnp.dot(x_NxD.astype(jnp.float32), router_DxE, precision=jax.lax.Precision.HIGHEST)
        logits_NxE = constrain(logits_NxE, ("batch", None))
        forced_NxK = None if forced_ids_BxTxK is None else forced_ids_BxTxK.reshape(B * T, -1)
        weights_NxK, ids_NxK = route(logits_NxE, bias_E, c, forced_NxK)

        # `expert_embed`, not `embed`: the routed experts' model dim is split over fsdp only, as
        # the expert axis already splits them (sharding.DEFAULT_RULES).
        w_gate = cast(param_with_axes(self, "gate_proj", (E, D, F), ("expert", "expert_embed", "mlp")), dt)
        w_up = cast(param_with_axes(self, "up_proj", (E, D, F), ("expert", "expert_embed", "mlp")), dt)
        w_down = cast(param_with_axes(self, "down_proj", (E, F, D), ("expert", "mlp", "expert_embed")), dt)
        priority_NxK = None
        if c.moe_dispatch == "capacity" or c.ep_buffer_factor is not None:
            scores_NxE = routing_lib.scores_from_logits(logits_NxE, c.scoring_func)
            priority_NxK = copy_priority(scores_NxE, ids_NxK, valid_BxT, B, T, c)
        routed_NxD, dropped = expert_parallel.routed_experts(
            x_NxD.astype(dt), w_gate, w_up, w_down, weights_NxK, ids_NxK, c, priority_NxK=priority_NxK)
        y_BxTxD = cast(routed_NxD.reshape(B, T, D), dt)
        if c.n_shared_experts:
            y_BxTxD = y_BxTxD + MLP(D, F * c.n_shared_experts, dt, name="shared_experts")(x_BxTxD)
        # Per device on its own rows (whole rows: the batch dim is split); the loss sums the
        # [B, E] results, an [E]-sized reduction, instead of gathering [tokens, E].
        valid = jnp.ones((B, T), jnp.int32) if valid_BxT is None else valid_BxT  # = None's meaning
        stats = expert_parallel.per_device(
            lambda lg, i, v: routing_stats(lg, i, v, v.shape[0], T, c), (logits_NxE, ids_NxK, valid))
        return y_BxTxD, stats | {
            "dropped": dropped, "expert_ids": ids_NxK.reshape(B, T, -1)}


def routing_stats(logits_NxE, ids_NxK, valid_BxT, B, T, c: ModelConfig) -> dict:
    """Per-row sums feeding the balance losses and load logging (outputs.MoEStats).

    valid_BxT: segment ids (0 = padding; a run of equal ids = one packed document) or a
    bool mask (one document per row); None = every token real, one document per row.
    """
    E, G = c.n_routed_experts, c.n_group
    valid_N = jnp.ones((B * T,), jnp.float32) if valid_BxT is None else (valid_BxT.reshape(-1) != 0).astype(jnp.float32)
    scores_NxE = routing_lib.scores_from_logits(logits_NxE, c.scoring_func)
    # V3 eq. 19: normalise sigmoid affinities over all experts (softmax ones already sum to 1).
    probs_NxE = scores_NxE / scores_NxE.sum(axis=-1, keepdims=True)
    counts_NxE = jax.nn.one_hot(ids_NxK, E, dtype=jnp.float32).sum(axis=1)
    # V2 eq. 18: a token is sent to a group (device) once, however many of its experts are there.
    group_tokens_NxG = (counts_NxE.reshape(-1, G, E // G).sum(-1) > 0).astype(jnp.float32)
    z_N = jax.nn.logsumexp(logits_NxE, axis=-1) ** 2
    per_row = lambda a: (a * valid_N.reshape((B * T,) + (1,) * (a.ndim - 1))).reshape((B, T) + a.shape[1:]).sum(1)
    return {"counts": per_row(counts_NxE), "probs": per_row(probs_NxE), "router_z": per_row(z_N),
            "tokens": valid_N.reshape(B, T).sum(1), "group_tokens": per_row(group_tokens_NxG),
            "seq_balance": _document_balance(counts_NxE, probs_NxE, valid_N, valid_BxT, B, T, c)}


def _document_balance(counts_NxE, probs_NxE, valid_N, seg_BxT, B, T, c: ModelConfig):
    """[B] V3's sequence-wise balance loss (eq. 17-20) per document, averaged over each row's
    documents: f_i = E / (K T_d) #{t in d: i in TopK(t)}, P_i = (1/T_d) sum_{t in d} s'_{i,t},
    L_d = sum_i f_i P_i. A document is a run of equal segment ids (packing keeps them contiguous)."""
    E, K = c.n_routed_experts, c.num_experts_per_tok
    seg_BxT = jnp.ones((B, T), jnp.int32) if seg_BxT is None else seg_BxT.astype(jnp.int32)
    starts_BxT = jnp.concatenate([jnp.ones((B, 1), bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
    doc_N = (jnp.cumsum(starts_BxT, axis=1) - 1 + T * jnp.arange(B)[:, None]).reshape(-1)  # row b: b*T + k
    ssum = lambda a: jax.ops.segment_sum(a * valid_N.reshape((-1,) + (1,) * (a.ndim - 1)), doc_N, B * T)
    tokens_D = ssum(jnp.ones_like(valid_N))
    f_DxE = ssum(counts_NxE) * E / (K * jnp.maximum(tokens_D, 1.0))[:, None]
    loss_D = jnp.sum(f_DxE * ssum(probs_NxE), axis=-1) / jnp.maximum(tokens_D, 1.0)
    real_BxT = (tokens_D > 0).astype(jnp.float32).reshape(B, T)  # padding-only runs are no document
    return loss_D.reshape(B, T).sum(1) / jnp.maximum(real_BxT.sum(1), 1.0)


# ----- load balancing --------------------------------------------------------------------------

_BIAS_LEAF = "e_score_correction_bias"


def _top_key(path) -> str:
    return str(getattr(path[0], "key", path[0]))


def _layer_order(path) -> tuple:
    """Sort key matching MoEStats' stacking: main layers by index, then MTP depths."""
    top = _top_key(path)
    if top == layer_stack.MOE_STACK:  # the scanned MoE layers (the only main-model stack with routers)
        return (False, 0)
    m = re.fullmatch(r"(layers|mtp)_(\d+)", top)
    if m is None:
        raise ValueError(f"{_BIAS_LEAF} under unexpected top-level key {top!r}; expected layers_i, "
                         f"{layer_stack.MOE_STACK} or mtp_k")
    return (m.group(1) == "mtp", int(m.group(2)))


def router_bias_paths(params) -> list:
    """Key paths of every `e_score_correction_bias` leaf, in MoEStats layer order (a scanned
    stack's leaf is one path holding [L, E], the biases of its L layers)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [p for p, _ in flat if str(getattr(p[-1], "key", p[-1])) == _BIAS_LEAF]
    return sorted(paths, key=_layer_order)


def bias_update(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """V3 §2.1.2 (aux-loss-free balancing): b_i += gamma * sign(mean_load - load_i)."""
    load_E = load_E.astype(jnp.float32)
    return (bias_E + rate * jnp.sign(load_E.mean() - load_E)).astype(bias_E.dtype)


def update_router_biases(params, counts_LxE: jax.Array, rate: float):
    """Applies `bias_update` to every router bias; returns new params (same tree).

    counts_LxE: GLOBAL-batch routed token-slots per expert, `MoEStats.counts.sum(axis=1)`
    (= the train step's `moe/expert_counts`), rows in MoEStats order: the main model's MoE
    layers in layer order (layers_0, layers_1, ... numerically), then the MTP blocks
    (mtp_0, ...). Call it outside the gradient, after the optimizer step. Pure and
    jit-friendly; the new biases keep the old ones' sharding.
    """
    paths = router_bias_paths(params)
    leaves = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    rows = [leaves[jax.tree_util.keystr(p)].shape[0] if _top_key(p) == layer_stack.MOE_STACK else 1
            for p in paths]
    if sum(rows) != counts_LxE.shape[0]:
        raise ValueError(f"counts_LxE has {counts_LxE.shape[0]} layers but the params hold {sum(rows)} "
                         f"layers of {_BIAS_LEAF}; pass MoEStats.counts.sum(axis=1) of this model")
    starts = np.cumsum([0] + rows)
    new = {jax.tree_util.keystr(p): (counts_LxE[starts[i]:starts[i + 1]], _top_key(p) == layer_stack.MOE_STACK)
           for i, p in enumerate(paths)}

    def upd(path, leaf):
        load = new.get(jax.tree_util.keystr(path))
        if load is None:
            return leaf
        load_LxE, stacked = load
        if stacked:  # [L, E] biases of a scanned stack, one row per layer
            return jax.vmap(bias_update, in_axes=(0, 0, None))(leaf, load_LxE, rate)
        return bias_update(leaf, load_LxE[0], rate)

    return jax.tree_util.tree_map_with_path(upd, params)


def load_stats(moe: MoEStats) -> dict[str, jax.Array]:
    """Per-layer load statistics for logging, each [L]: from the global-batch counts.

    max_over_mean: the busiest expert's load / the mean load (1 = balanced); cv: the
    coefficient of variation std / mean over experts; min_over_mean; drop_rate: the
    fraction of routed token-slots dropped by capacity dispatch.
    """
    counts_LxE = moe.counts.sum(axis=1).astype(jnp.float32)
    mean_L = counts_LxE.mean(-1)
    safe_L = jnp.maximum(mean_L, 1e-9)
    total_L = jnp.maximum(counts_LxE.sum(-1), 1.0)
    return {"max_over_mean": counts_LxE.max(-1) / safe_L, "min_over_mean": counts_LxE.min(-1) / safe_L,
            "cv": counts_LxE.std(-1) / safe_L, "drop_rate": moe.dropped.astype(jnp.float32) / total_L}
