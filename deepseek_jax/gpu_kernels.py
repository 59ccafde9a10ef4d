"""The kernels the model runs on NVIDIA GPUs, and the platform the model is being built for.

Dimension legend: M token copies, D model width, F expert width, E experts, B batch,
T query time, S key time, H query heads, G kv heads, K query/key head dim, A value head dim.

Why tokamax (the optional `[gpu]` extra, `pip install -e .[gpu]`):
- Grouped GEMM. XLA:GPU lowers `jax.lax.ragged_dot` to a dense dot over all E experts
  (E times the FLOPs; marin-community/marin #7012 measured 22.6 TFLOP/s against ~1,500 for a
  tuned grouped GEMM). tokamax's `ragged_dot` has Mosaic GPU kernels for sm90 (H100/H200)
  and sm100 (B200) and Pallas-Triton kernels elsewhere, forward and VJP (the weight
  gradient is its ragged-contracting kernel). We never let it take its "xla" path on GPU:
  that is the dense fallback this module exists to avoid.
- Flash attention. `jax.nn.dot_product_attention(implementation="cudnn")` needs equal q/k
  and v head dims (MLA has 192 / 128: v would have to be padded to 192, 50% more PV work),
  and it refuses to trace without cuDNN present ("cuDNN is not detected"), so a CPU machine
  cannot check its lowering. tokamax's flash attention takes a different value head dim,
  GQA, causal masks and dense boolean masks, and lowers on CPU for "cuda" (gpu_lowering.py).

Platform. `target_platform()` is what the model selects kernels for: jax's default backend,
or the platform set by `targeting("gpu")` while `gpu_lowering` lowers for "cuda" on a CPU
machine. `moe.grouped_impl`, `moe.route` ("auto") and `attention_impl="auto"` read it.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

_TARGET = contextvars.ContextVar("deepseek_jax_target_platform", default=None)
# Mosaic GPU first (sm90/sm100; it raises NotImplementedError elsewhere), then Triton (sm80+).
GPU_IMPLEMENTATIONS = ("mosaic_gpu", "triton")  # not "mosaic": off-GPU it means Mosaic TPU


def target_platform() -> str:
    """'gpu', 'tpu' or 'cpu': the platform traced code is meant to run on."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def targeting(platform: str):
    """Select kernels for `platform` ("gpu" | "tpu" | "cpu") while tracing, whatever the host."""
    if platform not in ("gpu", "tpu", "cpu"):
        raise ValueError(f"platform={platform!r}: use 'gpu', 'tpu' or 'cpu'")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def tokamax():
    """The tokamax module, or an ImportError that says how to install it."""
    try:
        import tokamax as tk
        from absl import flags
    except ImportError as e:
        raise ImportError("grouped_impl='tokamax' and GPU flash attention need tokamax: "
                          "pip install -e '.[gpu]' (or pick grouped_impl='ragged' / attention_impl="
                          "'blockwise')") from e
    # tokamax reads its config flags through absl, which parses sys.argv on first use and
    # rejects the host program's own arguments (pytest's -q, our --config): mark it parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tk


def available(op: str, preferred: tuple) -> tuple:
    """The `preferred` GPU kernels this tokamax has for `op` ("ragged_dot" | "attention"), in order.

    tokamax 0.0.12 (jax 0.10) has Pallas-Triton and Mosaic GPU kernels for both; from 0.0.17
    (jax >= 0.11) its Triton grouped GEMM needs the `triton` and `jax-triton` packages, and
    naming a kernel it lacks is an error even after one that works.
    """
    try:
        known = importlib.import_module(f"tokamax._src.ops.{op}.api").IMPLEMENTATIONS
    except (ImportError, AttributeError):  # a tokamax laid out otherwise: let it decide
        return preferred
    impls = tuple(i for i in preferred if i in known)
    if not impls:
        raise ImportError(f"this tokamax has none of the GPU kernels {preferred} for {op} "
                          f"(it has {sorted(known)}); install the tokamax pinned by setup.cfg's [gpu] extra")
    return impls


# ----- grouped GEMM --------------------------------------------------------------------------


def ragged_dot(x_MxD: jax.Array, w_ExDxF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """jax.lax.ragged_dot's contract on tokamax's GPU kernels: rows in group order, [M, F].

    Rows past sum(group_sizes) come out as the kernel leaves them; callers mask them.
    """
    D, F = w_ExDxF.shape[1:]
    # tokamax's Mosaic GPU kernels need 128-byte rows: with D or F not a multiple of 64
    # (bf16) their VJP fails to lower ("WGMMA rhs swizzle must match lhs swizzle"), after
    # tokamax has committed to them, so such (toy) shapes go to Triton first where it has one.
    preferred = GPU_IMPLEMENTATIONS if D % 64 == 0 and F % 64 == 0 else GPU_IMPLEMENTATIONS[::-1]
    return tokamax().ragged_dot(x_MxD, w_ExDxF, group_sizes_E, implementation=available("ragged_dot", preferred))


def grouped_ffn_tokamax(x_SxD, copies_per_row: int, ids_M, valid_M, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    """SwiGLU of each copy through its expert with tokamax's grouped GEMM (moe.grouped_ffn's contract).

    Copies are sorted by expert (invalid ones last, beyond every group), run through three
    ragged dots, masked and scattered back to copy order.
    """
    if x_SxD.dtype == jnp.float32 and "triton" not in available("ragged_dot", GPU_IMPLEMENTATIONS):
        # tokamax >= 0.0.17 without jax-triton has only its Mosaic GPU grouped GEMM, which takes
        # bf16/f16 only: a float32 model runs the exact block-sparse tiled path (no dense dot).
        from deepseek_jax import dispatch  # here: dispatch imports this module

        return dispatch.grouped_ffn_tiled(x_SxD, copies_per_row, ids_M, valid_M, w_gate_ExDxF, w_up_ExDxF,
                                          w_down_ExFxD)
    E = w_gate_ExDxF.shape[0]
    bucket_M = jnp.where(valid_M, ids_M, E)
    order_M = jnp.argsort(bucket_M, stable=True)
    group_sizes_E = jnp.bincount(bucket_M, length=E + 1)[:E].astype(jnp.int32)
    valid_sorted_Mx1 = valid_M[order_M, None]
    xs_MxD = jnp.where(valid_sorted_Mx1, x_SxD[order_M // copies_per_row], 0)
    h_MxF = (jax.nn.silu(ragged_dot(xs_MxD, w_gate_ExDxF, group_sizes_E))
             * ragged_dot(xs_MxD, w_up_ExDxF, group_sizes_E))
    ys_MxD = jnp.where(valid_sorted_Mx1, ragged_dot(h_MxF, w_down_ExFxD, group_sizes_E), 0)
    return jnp.zeros_like(ys_MxD).at[order_M].set(ys_MxD)


# ----- flash attention -----------------------------------------------------------------------


@flax.struct.dataclass
class FlashMask:
    """Causal attention within packed documents, for the GPU flash kernel (attention.attend).

    The twin of blockwise_attention.CausalSegmentMask: the mask described per position."""

    segment_ids: Optional[jax.Array] = None  # [B, T] int, or None (one document per row)


def flash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxA, *, scale: float, causal: bool = True,
                    segment_ids: Optional[jax.Array] = None, mask=None) -> jax.Array:
    """softmax(q k^T * scale, masked) v on tokamax's GPU flash kernels -> [B, T, H, A].

    Masks: `causal` plus packed-document `segment_ids` [B, T] (T == S), or a dense boolean
    `mask` [B or 1, 1, T, S] (the KV cache's prefill mask). K may differ from A (MLA).
    """
    if segment_ids is not None:
        same_BxTxS = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = same_BxTxS[:, None] if mask is None else mask & same_BxTxS[:, None]
    return tokamax().dot_product_attention(
        q_BxTxHxK, k_BxSxGxK, v_BxSxGxA, mask=mask, scale=scale, is_causal=causal,
        implementation=available("attention", GPU_IMPLEMENTATIONS))
