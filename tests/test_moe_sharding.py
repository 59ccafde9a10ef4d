"""MoE under a data x expert mesh moves only what it must: routing and its statistics run on
each device's own tokens, so the compiled train step has no all-gather of the step's tokens
(XLA's SPMD partitioner replicates TopK and the routing scatters under plain jit) and its
all-reduces are the gradients plus a few scalars and [E] counts. Oracle: the collective bytes
read from the compiled HLO (hlo_stats) against bounds derived from the shapes."""
import math

from deepseek_jax import experiment, planning


def _moe_cfg():
    cfg = experiment.load_config("configs/tiny_v3.py")  # E 8, K 2, 4 groups (top2_sum), sigmoid + bias
    cfg.model.update(dict(num_hidden_layers=2, first_k_dense_replace=1, num_mtp_layers=0))
    cfg.data.seq_len, cfg.data.batch_size, cfg.microbatches = 64, 8, 1
    cfg.mesh.update(dict(data=2, fsdp=1, expert=4, tensor=1))
    cfg.moe.dispatch = "dropless"
    cfg.remat = "none"
    return cfg


def test_moe_step_collectives_are_gradients_and_routed_tokens_only():
    cfg = _moe_cfg()
    r = planning.plan(cfg, 8)
    assert r["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    m = cfg.model
    E, K, D, G = m.n_routed_experts, m.num_experts_per_tok, m.hidden_size, m.n_group
    N = cfg.data.batch_size * cfg.data.seq_len  # the step's tokens
    n, P = N // 8, 4  # tokens per device, expert-parallel devices
    coll = r["collective_bytes"]
    # No fsdp, no tensor axis: nothing is gathered. Before routing ran per device, every MoE
    # layer all-gathered the step's [N, G, E / G] group scores for TopK (N * E * 4 bytes).
    assert coll["all_gather"] == 0, coll
    # Gradients: each device all-reduces its float32 parameter shards (data x expert for the
    # replicated weights, data for its experts' slices) once; plus scalar metrics and [E]-sized
    # load counts, far below one [N, E] float32 array (the scatter-add all-reduce before).
    slack = 8192
    assert slack < N * E * 4
    grads = r["per_device_bytes"]["params"]
    assert grads <= coll["all_reduce"] <= grads + slack, (coll["all_reduce"], grads)
    # Dropless expert parallelism: per MoE layer, forward sends tokens out, expert ids out and
    # outputs back through fixed buffers of P x S rows, S = n * min(K, E / P); the backward
    # sends the two activation exchanges' cotangents. float32 rows of D, int32 ids.
    S = n * min(K, E // P)
    layers = m.num_hidden_layers - m.first_k_dense_replace
    a2a = layers * (4 * P * S * D * 4 + P * S * 4)
    assert coll["all_to_all"] == a2a, (coll["all_to_all"], a2a)
    assert coll["reduce_scatter"] == 0
    assert math.isfinite(r["est_step_s"])
