"""The GPU path, checked on CPU: the train step and the sampler lowered for "cuda" reach the
intended kernels (Pallas routing, tokamax's grouped GEMM and flash attention) and no
`ragged_dot` (which XLA:GPU runs as a dense dot over all experts).

Oracle: the kernel names JAX and tokamax give their custom calls (the Pallas `name=` of
each kernel), independent of the code under test; lowering needs no GPU.
"""
import jax
import pytest

from deepseek_jax import dispatch, experiment, gpu_kernels, gpu_lowering
from deepseek_jax.blockwise_attention import resolve_attention_impl

TRITON = gpu_lowering.TRITON


@pytest.fixture(scope="module")
def lowered():
    # bf16 as on a GPU; one device: see the report on expert parallelism (shard_map's
    # check_vma rejects tokamax's pallas_calls, whose out_shapes carry no vma).
    cfg = experiment.load_config("configs/tiny_v3.py:bf16",
                                 ["mesh.data=1", "data.batch_size=2", "data.seq_len=32", "moe.routing_impl=auto"])
    return gpu_lowering.lower_for_cuda(cfg, devices=jax.devices()[:1])


def test_selection_follows_the_target_platform():
    assert dispatch.grouped_impl() == "tiled" and resolve_attention_impl("auto") == "blockwise"
    with gpu_kernels.targeting("gpu"):
        assert dispatch.grouped_impl() == "tokamax"  # never ragged_dot on GPU
        assert resolve_attention_impl("auto") == "flash"
    with gpu_kernels.targeting("tpu"):
        assert dispatch.grouped_impl() == "ragged"


@pytest.mark.slow
def test_train_step_and_decode_lower_to_gpu_kernels(lowered):
    assert lowered["lowered"], lowered.get("error")
    assert lowered["ragged_dot_ops"] == 0
    train, decode = set(lowered["train"]["custom_calls"]), set(lowered["decode"]["custom_calls"])
    assert f"{TRITON}:moe_route" in train and f"{TRITON}:moe_route" in decode
    assert {f"{TRITON}:pallas_flash_attention_fwd_res", f"{TRITON}:pallas_flash_attention_vjp"} <= train
    # tokamax's grouped GEMM: its Triton kernel (tiny_v3's F=48 is below the Mosaic sm90
    # kernel's tile) or the Mosaic GPU one at real sizes.
    gemm = {f"{TRITON}:_unknown_", gpu_lowering.MOSAIC_GPU}
    assert train & gemm and decode & gemm
