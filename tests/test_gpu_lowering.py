"""The GPU path, checked on CPU: the train step (tiny V3, expert parallelism in shard_map) and
the sampler lowered for "cuda" reach the intended kernels (Pallas routing, tokamax's grouped
GEMM and flash attention) and no `ragged_dot` (which XLA:GPU runs as a dense dot over all
experts), through `python -m deepseek_jax.plan --platform cuda --json`.

Oracles: the kernel names JAX and tokamax give their custom calls (the Pallas `name=` of a
kernel, the op class tokamax annotates its calls with), independent of the code under test;
the single-device dense expert FFN for expert-parallel gradients.
"""
import contextlib
import io
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax import dispatch, expert_parallel, gpu_kernels, gpu_lowering, moe, plan, sharding
from deepseek_jax.blockwise_attention import resolve_attention_impl
from deepseek_jax.config import ModelConfig

TRITON, MOSAIC = gpu_lowering.TRITON, gpu_lowering.MOSAIC_GPU


@pytest.fixture(scope="module")
def report():
    # bf16 as on a GPU; 2 data x 4 expert devices; moe_intermediate_size 64 so the grouped
    # GEMM takes tokamax's Mosaic GPU kernel (the H100/H200 one) as at real sizes; two
    # layers (one dense, one MoE), no MTP block (one more MoE layer, nothing new to lower),
    # short sequences: lowering only.
    argv = ["--config", "configs/tiny_v3.py:bf16", "--devices", "8", "--platform", "cuda", "--json",
            "--config.mesh.data=2", "--config.mesh.expert=4", "--config.data.batch_size=8",
            "--config.data.seq_len=32", "--config.model.num_hidden_layers=2", "--config.model.num_mtp_layers=0",
            "--config.model.moe_intermediate_size=64", "--config.moe.routing_impl=auto"]
    out = io.StringIO()
    with mock.patch.dict(os.environ), contextlib.redirect_stdout(out):  # plan.main sets XLA_FLAGS
        plan.main(argv)
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_selection_follows_the_target_platform():
    assert dispatch.grouped_impl() == "tiled" and resolve_attention_impl("auto") == "blockwise"
    with gpu_kernels.targeting("gpu"):
        assert dispatch.grouped_impl() == "tokamax"  # never ragged_dot on GPU
        assert resolve_attention_impl("auto") == "flash"
    with gpu_kernels.targeting("tpu"):
        assert dispatch.grouped_impl() == "ragged"


def test_plan_cuda_lowers_train_step_with_expert_parallelism_and_decode_to_gpu_kernels(report):
    assert report["lowered"], report.get("error")
    assert report["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert report["ragged_dot_ops"] == 0
    train, decode = set(report["train"]["custom_calls"]), set(report["decode"]["custom_calls"])
    assert report["train"]["all_to_all_ops"] > 0  # the experts really ran expert-parallel
    route, gemm = f"{TRITON}:moe_route", f"{MOSAIC}:PallasMosaicGpuRaggedDot"
    assert {route, gemm, f"{MOSAIC}:PallasMosaicGpuFlashAttention",
            f"{MOSAIC}:PallasMosaicGpuFlashAttentionVjp"} <= train
    # The sampler's prefill attends with the flash kernel too (Transformer(prefill=True)).
    assert {route, gemm, f"{MOSAIC}:PallasMosaicGpuFlashAttention"} <= decode
    assert set(report["custom_calls"]) == train | decode


def test_toy_expert_widths_lower_with_their_vjp():
    # D or F not a multiple of 64 (tiny_v3's F = 48): tokamax 0.0.12's Mosaic GPU VJP cannot
    # lower them ("WGMMA rhs swizzle"), so its Triton kernel takes them; 0.0.17 (no Pallas-
    # Triton grouped GEMM) lowers them on Mosaic GPU.
    args = [jax.ShapeDtypeStruct(s, d) for s, d in (((256, 64), jnp.bfloat16), ((2, 64, 48), jnp.bfloat16),
                                                    ((2,), jnp.int32))]
    loss = lambda x, w, g: jnp.sum(gpu_kernels.ragged_dot(x, w, g).astype(jnp.float32))  # noqa: E731
    with gpu_lowering.cuda_cross_lowering():
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",))
        first = gpu_kernels.available("ragged_dot", ("triton", "mosaic_gpu"))[0]
    want = f"{TRITON}:PallasTritonRaggedDot" if first == "triton" else f"{MOSAIC}:PallasMosaicGpuRaggedDot"
    assert gpu_lowering.summarize(lowered) == {"custom_calls": [want], "ragged_dot_ops": 0, "all_to_all_ops": 0}


def test_expert_parallel_gradients_without_vma_check_match_dense():
    # The GPU path runs shard_map with check_vma=False (tokamax's VJP declares no varying
    # axes); shard_map's transpose must then still sum the weights' gradients over `data`.
    N, E, K, D, F = 64, 16, 4, 16, 8
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (N, D))
    ws = [0.3 * jax.random.normal(k, s) for k, s in zip(ks[1:4], ((E, D, F), (E, D, F), (E, F, D)))]
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(ks[4], (N, E))), K)
    r = jax.random.normal(ks[5], (N, D))
    cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=F)
    loss = lambda fn: lambda x, ws, w: jnp.sum(fn(x, *ws, w, ids.astype(jnp.int32))[0] * r)  # noqa: E731
    grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(x, ws, weights)  # noqa: E731
    g_ref = grad(moe.expert_ffn_dense)
    with jax.set_mesh(sharding.make_mesh(dict(data=2, expert=4))):
        g = grad(lambda *a: expert_parallel.routed_experts(*a, cfg, check_vma=False))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) <= 1e-5


def test_float32_grouped_ffn_lowers_without_ragged_dot():
    # tokamax 0.0.17's only grouped GEMM (Mosaic GPU) takes bf16/f16: float32 runs the tiled
    # path there (a while loop of per-tile matmuls), Triton's kernel with tokamax 0.0.12.
    S, E, D, F = 32, 4, 64, 64
    shapes = [((S, D), jnp.float32), ((2 * S,), jnp.int32), ((2 * S,), jnp.bool_)] + [((E, D, F), jnp.float32)] * 2
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes + [((E, F, D), jnp.float32)]]
    with gpu_lowering.cuda_cross_lowering():
        fn = lambda x, ids, valid, *ws: gpu_kernels.grouped_ffn_tokamax(x, 2, ids, valid, *ws)  # noqa: E731
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        has_triton = "triton" in gpu_kernels.available("ragged_dot", ("triton", "mosaic_gpu"))
    out = gpu_lowering.summarize(lowered)
    assert out["ragged_dot_ops"] == 0
    assert out["custom_calls"] == ([f"{TRITON}:PallasTritonRaggedDot"] if has_triton else [])
    assert ("stablehlo.while" in lowered.as_text()) != has_triton  # the tiled loop
