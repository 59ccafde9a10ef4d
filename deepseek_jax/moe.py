"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V2 §2.2, V3 §2.1.2).

Dimension legend: B batch, T time, D model width, F expert width (moe_intermediate_size),
E routed experts, K experts per token, N = B*T tokens, M = N*K token copies, C capacity.

  out = x_shared(x) + sum_{k<K} w_k * Expert_{id_k}(x)
Routing (scores, selection-only bias, group limit, top-k, renormalise, scale) is
`pallas_kernels.routing.route_reference` (or its Pallas kernel); router math is float32.

Dispatch backends compute the same function:
  dense     every expert on every token, combined with a [N, E] weight matrix (test oracle)
  dropless  token copies sorted by expert, one grouped matmul, nothing dropped
  capacity  GShard-style fixed capacity per expert; overflowing copies are dropped and counted
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, param_with_axes
from pallas_kernels import routing as routing_lib


def route(logits_NxE: jax.Array, bias_E: Optional[jax.Array], c: ModelConfig):
    """Dispatch to the routing implementation named by `config.routing_impl`."""
    impl = c.routing_impl
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    kwargs = dict(top_k=c.num_experts_per_tok, n_groups=c.n_group, topk_groups=c.topk_group,
                  score_func=c.scoring_func, group_score=c.group_score, norm_topk=c.norm_topk_prob,
                  scale=c.routed_scaling_factor)
    if impl == "pallas":
        return routing_lib.route(logits_NxE, bias_E, interpret=jax.default_backend() != "gpu", **kwargs)
    return routing_lib.route_reference(logits_NxE, bias_E, **kwargs)


def expert_ffn_dense(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK):
    """Reference: all experts on all tokens (E times the useful FLOPs)."""
    N, E = x_NxD.shape[0], w_gate_ExDxF.shape[0]
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x_NxD, w_gate_ExDxF)) * jnp.einsum("nd,edf->nef", x_NxD, w_up_ExDxF)
    y_NxExD = jnp.einsum("nef,efd->ned", h, w_down_ExFxD)
    combine_NxE = jnp.zeros((N, E), weights_NxK.dtype).at[jnp.arange(N)[:, None], ids_NxK].add(weights_NxK)
    return jnp.einsum("ned,ne->nd", y_NxExD, combine_NxE.astype(y_NxExD.dtype)), jnp.zeros((), jnp.int32)


def expert_ffn_dropless(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK):
    """Sort token copies by expert and run one grouped matmul (`ragged_dot`) per projection."""
    N, K = ids_NxK.shape
    E = w_gate_ExDxF.shape[0]
    flat_ids_M = ids_NxK.reshape(-1)
    order_M = jnp.argsort(flat_ids_M, stable=True)
    group_sizes_E = jnp.bincount(flat_ids_M, length=E).astype(jnp.int32)
    xs_MxD = x_NxD[order_M // K]
    h = (jax.nn.silu(jax.lax.ragged_dot(xs_MxD, w_gate_ExDxF, group_sizes_E))
         * jax.lax.ragged_dot(xs_MxD, w_up_ExDxF, group_sizes_E))
    ys_MxD = jax.lax.ragged_dot(h, w_down_ExFxD, group_sizes_E)
    y_MxD = jnp.zeros_like(ys_MxD).at[order_M].set(ys_MxD)
    out = jnp.einsum("nkd,nk->nd", y_MxD.reshape(N, K, -1), weights_NxK.astype(y_MxD.dtype))
    return out, jnp.zeros((), jnp.int32)


def expert_capacity(num_tokens: int, c: ModelConfig) -> int:
    return max(1, math.ceil(num_tokens * c.num_experts_per_tok / c.n_routed_experts * c.capacity_factor))


def expert_ffn_capacity(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK, capacity):
    """GShard dispatch: each expert takes at most `capacity` copies, in token order (k-major)."""
    N, K = ids_NxK.shape
    E = w_gate_ExDxF.shape[0]
    # Priority: all first choices before any second choice (GShard / Switch), then token order.
    ids_KN = ids_NxK.T.reshape(-1)
    onehot_MxE = jax.nn.one_hot(ids_KN, E, dtype=jnp.int32)
    slot_M = (jnp.cumsum(onehot_MxE, axis=0) * onehot_MxE).sum(-1) - 1
    keep_M = slot_M < capacity
    dest_M = jnp.where(keep_M, ids_KN * capacity + slot_M, E * capacity)  # overflow -> a trash row
    token_M = jnp.tile(jnp.arange(N), K)
    buf = jnp.zeros((E * capacity + 1, x_NxD.shape[1]), x_NxD.dtype).at[dest_M].set(x_NxD[token_M])
    xe_ExCxD = buf[:-1].reshape(E, capacity, -1)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe_ExCxD, w_gate_ExDxF)) * jnp.einsum("ecd,edf->ecf", xe_ExCxD, w_up_ExDxF)
    ye = jnp.einsum("ecf,efd->ecd", h, w_down_ExFxD).reshape(E * capacity, -1)
    ye = jnp.concatenate([ye, jnp.zeros((1, ye.shape[1]), ye.dtype)])
    y_KxNxD = ye[dest_M].reshape(K, N, -1)
    out = jnp.einsum("knd,nk->nd", y_KxNxD, weights_NxK.astype(y_KxNxD.dtype))
    return out, (~keep_M).sum().astype(jnp.int32)


class MoE(nn.Module):
    """Router + routed experts + shared experts. Returns (y [B, T, D], per-row statistics)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, valid_BxT: Optional[jax.Array] = None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        B, T, D = x_BxTxD.shape
        E, F, K = c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
        x_NxD = x_BxTxD.reshape(B * T, D)

        router_DxE = param_with_axes(self, "router", (D, E), ("embed", None))
        bias_E = None
        if c.router_bias:
            # Not trained by gradients: the aux-loss-free rule updates it (V3 eq. 16).
            bias_E = jax.lax.stop_gradient(
                param_with_axes(self, "e_score_correction_bias", (E,), (None,), nn.initializers.zeros))
        logits_NxE = jnp.dot(x_NxD.astype(jnp.float32), router_DxE, precision=jax.lax.Precision.HIGHEST)
        weights_NxK, ids_NxK = route(logits_NxE, bias_E, c)

        w_gate = param_with_axes(self, "gate_proj", (E, D, F), ("expert", "embed", "mlp")).astype(dt)
        w_up = param_with_axes(self, "up_proj", (E, D, F), ("expert", "embed", "mlp")).astype(dt)
        w_down = param_with_axes(self, "down_proj", (E, F, D), ("expert", "mlp", "embed")).astype(dt)
        args = (x_NxD.astype(dt), w_gate, w_up, w_down, weights_NxK, ids_NxK)
        if c.moe_dispatch == "dense":
            routed_NxD, dropped = expert_ffn_dense(*args)
        elif c.moe_dispatch == "capacity":
            routed_NxD, dropped = expert_ffn_capacity(*args, expert_capacity(B * T, c))
        else:
            routed_NxD, dropped = expert_ffn_dropless(*args)
        y_BxTxD = routed_NxD.reshape(B, T, D).astype(dt)
        if c.n_shared_experts:
            y_BxTxD = y_BxTxD + MLP(D, F * c.n_shared_experts, dt, name="shared_experts")(x_BxTxD)
        return y_BxTxD, routing_stats(logits_NxE, ids_NxK, valid_BxT, B, T, c) | {"dropped": dropped}


def routing_stats(logits_NxE, ids_NxK, valid_BxT, B, T, c: ModelConfig) -> dict:
    """Per-row sums feeding the balance losses and load logging (outputs.MoEStats)."""
    E = c.n_routed_experts
    valid_N = jnp.ones((B * T,), jnp.float32) if valid_BxT is None else valid_BxT.reshape(-1).astype(jnp.float32)
    scores_NxE = routing_lib.scores_from_logits(logits_NxE, c.scoring_func)
    # V3 eq. 19: normalise sigmoid affinities over all experts (softmax ones already sum to 1).
    probs_NxE = scores_NxE / scores_NxE.sum(axis=-1, keepdims=True)
    counts_NxE = jax.nn.one_hot(ids_NxK, E, dtype=jnp.float32).sum(axis=1)
    z_N = jax.nn.logsumexp(logits_NxE, axis=-1) ** 2
    per_row = lambda a: (a * valid_N.reshape((B * T,) + (1,) * (a.ndim - 1))).reshape((B, T) + a.shape[1:]).sum(1)
    return {"counts": per_row(counts_NxE), "probs": per_row(probs_NxE), "router_z": per_row(z_N),
            "tokens": valid_N.reshape(B, T).sum(1)}
