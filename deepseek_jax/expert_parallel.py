"""Expert parallelism: routed experts inside `jax.shard_map` with all-to-all (GShard, DeepSeek-V3 §3.2).

Dimension legend: n local tokens, K experts per token, m = n*K local copies, D model width,
F expert width, E routed experts, El = E / P experts per device, P the `expert` mesh axis size,
S per-peer slots, C capacity per expert and source device.

When a mesh is active (`jax.set_mesh`) and one of its batch axes (data, fsdp, expert) is
larger than 1, `routed_experts` runs the routed experts per device on that device's tokens
(the batch is split over data x fsdp x expert). Expert weights are split on E over
`expert` (sharding.DEFAULT_RULES); their `embed`/`mlp` dims are gathered at the shard_map
boundary (jit inserts the all-gather over fsdp/tensor, and the reduce-scatter of its
gradient). With P > 1, token copies travel to the device owning their expert and back:
  dropless  fixed per-peer buffers of S = n * min(K, El) slots: a token sends at most
            min(K, El) copies to one peer, so no routing can overflow them (nothing is
            dropped; the price is P * min(K, El) / K times the copies actually sent, kept
            for the backward in every layer). `moe.ep_buffer_factor` f sizes them
            S = ceil(f * n * K / P) instead: a copy past its peer's S valid copies (in token
            order; padding is never sent) is dropped and counted.
            Plain `all_to_all` (REFERENCES: ragged_all_to_all does not compile on CPU
            and is unreliable on GPU). The receiver runs the grouped matmul on its El experts.
  capacity  policy "affinity" (DeepSeek-V2 §2.2.4): each device computes at most
            ceil(n K * factor) copies, from all sources of its expert group together; the
            sources all-gather every copy's priority (affinity score) and destination over
            `expert`, so each knows which of its copies are among its destination's
            highest-priority ones (`dispatch.affinity_keep`, the same ranking on every
            device) and sends only those, through the dropless exchange. Drops depend on
            the data split (an expert group routes its own n * P tokens).
            Policy "gshard": each source device gives every expert C = ceil(n K / E * factor)
            slots (capacity per device group, so drops depend on the data split; with
            enough capacity every mesh gives the same result).
            Dropped copies of valid tokens are summed over the mesh.
  dense     reference: tokens all-gathered over `expert`, every local expert on every
            token, partial outputs reduce-scattered back.
Groups of the group-limited router are contiguous expert ranges, so with n_group a
multiple of P each device holds whole groups and a token reaches at most topk_group
devices (V2 device-limited / V3 node-limited routing). `sharding.validate_for_mesh`
rejects meshes that cannot work, before anything is compiled.
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax import dispatch
from deepseek_jax.config import ModelConfig
from deepseek_jax.sharding import BATCH_AXES, validate_for_mesh

log = logging.getLogger(__name__)
EXPERT_AXIS = "expert"


def active_mesh():
    """The mesh set by `jax.set_mesh` (abstract inside jit), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def batch_shards(leading: int, mesh=None) -> int:
    """Into how many pieces `per_device` splits a leading dim of size `leading`: the devices
    of the batch axes (data, fsdp, expert) when they divide it, else 1 (it runs whole)."""
    mesh = mesh if mesh is not None else active_mesh()
    dp = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names) if mesh is not None else 1
    return dp if leading % dp == 0 else 1


def per_device(fn, split, shared=(), mesh=None):
    """fn(*split, *shared) run on each device's own tokens: `split` arrays are divided on their
    leading (token or row) dim over the batch axes (data, fsdp, expert), `shared` ones replicated;
    every output's leading dim is split the same way.

    For token-wise work (routing, per-row statistics). XLA's SPMD partitioner replicates
    TopK (and scatters whose indices it cannot prove per-token), so under plain jit it
    all-gathers every token of the step to each device. Without a mesh, with one data-parallel
    device or a leading dim the devices do not divide, it is just fn(*split, *shared).
    """
    mesh = mesh if mesh is not None else active_mesh()
    batch_axes = tuple(a for a in BATCH_AXES if mesh is not None and a in mesh.axis_names)
    dp = math.prod(mesh.shape[a] for a in batch_axes) if batch_axes else 1
    if dp == 1 or any(a.shape[0] % dp for a in split):
        return fn(*split, *shared)
    specs = (P(batch_axes),) * len(split) + (P(),) * len(shared)
    # check_vma off: a Pallas routing kernel declares no varying axes; gradients of the
    # replicated `shared` inputs are summed over the devices by shard_map's transpose.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(batch_axes), check_vma=False)(*split, *shared)


def routed_experts(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK, c: ModelConfig,
                   mesh=None, priority_NxK=None, check_vma=None):
    """The routed experts' combined output [N, D] and dropped copies (int32 scalar).

    priority_NxK: capacity dispatch's keep order (`moe.copy_priority`; None = all equal).
    check_vma: shard_map's varying-axes type check; None = on, except with tokamax's GPU
    grouped GEMM, whose custom VJP returns weight gradients that declare no varying mesh
    axes (shard_map rejects them). Off, shard_map's transpose sums the weights' gradients
    over the mesh axes their in_spec does not name, as autodiff does with it on.

    Local when no mesh (or a one-device mesh) is active; otherwise shard_map over the
    mesh as described in the module docstring. Results do not depend on the mesh, except
    which copies capacity dispatch drops when it drops any.
    """
    mesh = mesh if mesh is not None else active_mesh()
    batch_axes = tuple(a for a in BATCH_AXES if mesh is not None and a in mesh.axis_names)
    dp = math.prod(mesh.shape[a] for a in batch_axes) if batch_axes else 1
    if priority_NxK is None:
        priority_NxK = jnp.zeros(ids_NxK.shape, jnp.float32)
    args = (x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, weights_NxK, ids_NxK)
    if dp == 1:
        return dispatch.expert_ffn(*args, c, priority_NxK)
    validate_for_mesh(c, mesh)
    N = x_NxD.shape[0]
    if N % dp:
        log.warning("MoE: %d tokens do not split over the %d data-parallel devices; running the "
                    "experts without expert parallelism (XLA partitions it)", N, dp)
        return dispatch.expert_ffn(*args, c, priority_NxK)
    has_ep = EXPERT_AXIS in mesh.axis_names and mesh.shape[EXPERT_AXIS] > 1
    tok, w_spec = P(batch_axes, None), P(EXPERT_AXIS if has_ep else None, None, None)

    def body(x, wg, wu, wd, wts, ids, pri):
        if not has_ep:
            y, dropped = dispatch.expert_ffn(x, wg, wu, wd, wts, ids, c, pri)
        elif c.moe_dispatch == "dense":
            y, dropped = _dense_ep(x, wg, wu, wd, wts, ids)
        elif c.moe_dispatch == "capacity" and c.capacity_policy == "affinity":
            y, dropped = _affinity_ep(x, wg, wu, wd, wts, ids, pri, c)
        elif c.moe_dispatch == "capacity":
            y, dropped = _capacity_ep(x, wg, wu, wd, wts, ids, pri >= 0, c)
        else:
            y, dropped = _dropless_ep(x, wg, wu, wd, wts, ids, (pri >= 0).reshape(-1),
                                       ep_buffer_slots(x.shape[0], c))
        return y, jax.lax.psum(dropped, batch_axes)

    if check_vma is None:
        check_vma = dispatch.grouped_impl() != "tokamax"
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, w_spec, w_spec, w_spec, tok, tok, tok),
                       out_specs=(tok, P()), check_vma=check_vma)
    return fn(*args, priority_NxK)


def _exchange(buf_PxSx, axis=EXPERT_AXIS):
    """Chunk p goes to peer p; the result's chunk p came from peer p."""
    return jax.lax.all_to_all(buf_PxSx, axis, 0, 0, tiled=True)


def ep_buffer_slots(n: int, c: ModelConfig):
    """Per-peer buffer slots S of the dropless exchange for n local tokens (None: worst case)."""
    if c.ep_buffer_factor is None:
        return None
    return math.ceil(c.ep_buffer_factor * n * c.num_experts_per_tok / jax.lax.axis_size(EXPERT_AXIS))


def _dropless_ep(x_nxD, wg_ElxDxF, wu_ElxDxF, wd_ElxFxD, weights_nxK, ids_nxK, send_m, slots=None):
    """The copies with send_m to their expert's device and back through fixed per-peer buffers
    of S = n * min(K, El) slots (no routing overflows them) or min(that, `slots`); returns
    (output, sent copies that did not fit)."""
    n, K = ids_nxK.shape
    D, El = x_nxD.shape[1], wg_ElxDxF.shape[0]
    Pn = jax.lax.axis_size(EXPERT_AXIS)
    S = n * min(K, El) if slots is None else min(slots, n * min(K, El))
    ids_m = ids_nxK.reshape(-1)  # copy m = t * K + k
    peer_m, local_m = ids_m // El, (ids_m % El).astype(jnp.int32)
    onehot_mxP = jax.nn.one_hot(peer_m, Pn, dtype=jnp.int32) * send_m[:, None]
    rank_m = (jnp.cumsum(onehot_mxP, axis=0) * onehot_mxP).sum(-1) - 1  # among sent copies to the peer
    fits_m = send_m & (rank_m < S)
    dest_m = jnp.where(fits_m, peer_m * S + rank_m, Pn * S)  # Pn * S: out of range, not sent
    send_x = jnp.zeros((Pn * S, D), x_nxD.dtype).at[dest_m].set(jnp.repeat(x_nxD, K, axis=0), mode="drop")
    send_e = jnp.full((Pn * S,), -1, jnp.int32).at[dest_m].set(local_m, mode="drop")
    recv_x = _exchange(send_x.reshape(Pn, S, D)).reshape(Pn * S, D)
    recv_e = _exchange(send_e.reshape(Pn, S)).reshape(Pn * S)
    y_recv = dispatch.grouped_ffn(recv_x, 1, jnp.maximum(recv_e, 0), recv_e >= 0,
                                  wg_ElxDxF, wu_ElxDxF, wd_ElxFxD)
    y_back = _exchange(y_recv.reshape(Pn, S, D)).reshape(Pn * S, D)
    y_mxD = jnp.take(y_back, dest_m, axis=0, mode="fill", fill_value=0)
    return dispatch.combine(y_mxD, weights_nxK), (send_m & ~fits_m).sum().astype(jnp.int32)


def _affinity_ep(x_nxD, wg_ElxDxF, wu_ElxDxF, wd_ElxFxD, weights_nxK, ids_nxK, priority_nxK, c: ModelConfig):
    """DeepSeek-V2 token dropping: each device keeps its budget of highest-priority copies."""
    n, K = ids_nxK.shape
    m, El = n * K, wg_ElxDxF.shape[0]
    Pn = jax.lax.axis_size(EXPERT_AXIS)
    priority_m = jax.lax.stop_gradient(priority_nxK).reshape(-1)  # copy m = t * K + k
    peer_m = (ids_nxK.reshape(-1) // El).astype(jnp.int32)
    # A destination's budget is shared by every source of the expert group: gather the
    # (small) priorities and destinations, rank them identically everywhere, keep our slice.
    gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
    keep_all = dispatch.affinity_keep(gather(priority_m), gather(peer_m), Pn, dispatch.device_budget(n, c))
    keep_m = jax.lax.dynamic_slice_in_dim(keep_all, jax.lax.axis_index(EXPERT_AXIS) * m, m)
    y, _ = _dropless_ep(x_nxD, wg_ElxDxF, wu_ElxDxF, wd_ElxFxD, weights_nxK, ids_nxK, keep_m)  # worst-case S: every kept copy fits
    return y, (~keep_m & (priority_m >= 0)).sum().astype(jnp.int32)


def _capacity_ep(x_nxD, wg_ElxDxF, wu_ElxDxF, wd_ElxFxD, weights_nxK, ids_nxK, valid_nxK, c: ModelConfig):
    n, K = ids_nxK.shape
    D, El = x_nxD.shape[1], wg_ElxDxF.shape[0]
    Pn = jax.lax.axis_size(EXPERT_AXIS)
    C = dispatch.expert_capacity(n, c)
    dest_m, keep_m = dispatch.capacity_slots(ids_nxK, El * Pn, C)  # expert e = peer * El + local
    token_m = jnp.tile(jnp.arange(n), K)
    send = jnp.zeros((Pn * El * C, D), x_nxD.dtype).at[dest_m].set(x_nxD[token_m], mode="drop")
    recv_PxElxCxD = _exchange(send.reshape(Pn, El * C, D)).reshape(Pn, El, C, D)
    xe_ElxPCxD = recv_PxElxCxD.transpose(1, 0, 2, 3).reshape(El, Pn * C, D)
    ye = dispatch.swiglu(xe_ElxPCxD, wg_ElxDxF, wu_ElxDxF, wd_ElxFxD, "ecd,edf->ecf", "ecf,efd->ecd")
    back = _exchange(ye.reshape(El, Pn, C, D).transpose(1, 0, 2, 3).reshape(Pn, El * C, D))
    y_KxnxD = jnp.take(back.reshape(Pn * El * C, D), dest_m, axis=0, mode="fill", fill_value=0).reshape(K, n, D)
    out = jnp.einsum("knd,nk->nd", y_KxnxD, weights_nxK.astype(y_KxnxD.dtype))
    return out, (~keep_m & valid_nxK.T.reshape(-1)).sum().astype(jnp.int32)


def _dense_ep(x_nxD, wg_ElxDxF, wu_ElxDxF, wd_ElxFxD, weights_nxK, ids_nxK):
    El = wg_ElxDxF.shape[0]
    first = jax.lax.axis_index(EXPERT_AXIS) * El
    gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
    x_all, w_all, ids_all = gather(x_nxD), gather(weights_nxK), gather(ids_nxK)
    local = (ids_all >= first) & (ids_all < first + El)
    # Copies for other devices' experts get weight 0 (and any in-range id): they add nothing.
    y_all, _ = dispatch.expert_ffn_dense(x_all, wg_ElxDxF, wu_ElxDxF, wd_ElxFxD,
                                        jnp.where(local, w_all, 0), jnp.where(local, ids_all - first, 0))
    return jax.lax.psum_scatter(y_all, EXPERT_AXIS, scatter_dimension=0, tiled=True), jnp.zeros((), jnp.int32)
