"""Lower the real train step and the sampler for "cuda" on any machine, and list their kernels.

    out = lower_for_cuda(cfg)        # cfg: an experiment ConfigDict (experiment.load_config)
    out["lowered"], out["custom_calls"], out["ragged_dot_ops"]

What the check is for: the GPU path must reach the intended kernels (tokamax's grouped
GEMM and flash attention, the Pallas routing kernel) and never `ragged_dot`, which XLA:GPU
lowers to a dense dot over all experts. Lowering stops before any GPU compiler runs, so
it is necessary, not sufficient: `experiments/benchmarks/gpu_suite.py` runs the kernels.

How it lowers without a GPU (`cuda_cross_lowering`):
- `gpu_kernels.targeting("gpu")`: the model selects its GPU kernels although the host is a CPU;
- `pallas_kernels.cross_lowering.as_gpu`: JAX >= 0.11 asks Pallas-Triton which GPU it targets;
- tokamax: `tokamax.config.cross_compile(True)` lifts its "is a GPU present" checks, and its
  per-architecture kernel choice (sm90 / sm100) reads the default device's compute
  capability, which a CPU does not have: we answer `compute_capability` (9.0 = H100/H200)
  for the duration of the lowering (`gpu_utils._compute_capability` of tokamax 0.0.12 and 0.0.17).

The train step lowers on the config's mesh: with an `expert` axis the routed experts run in
shard_map with all-to-all (`all_to_all_ops` counts them) and check_vma off, which tokamax's
VJP needs (expert_parallel.routed_experts).
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Optional
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import gpu_kernels

# Kernel names as they appear in the lowered module (stablehlo.custom_call targets).
MOSAIC_GPU = "mosaic_gpu_v2"  # tokamax's sm90/sm100 kernels (and any plgpu kernel)
TRITON = "__gpu$xla.gpu.triton"  # Pallas-Triton kernels; the kernel's name is in its backend config
# tokamax ops as `kernel_calls` names them (TARGET:op class), whichever GPU kernel they chose.
GROUPED_GEMM_OPS = ("PallasMosaicGpuRaggedDot", "PallasTritonRaggedDot")
FLASH_ATTENTION_OPS = ("PallasMosaicGpuFlashAttention", "PallasTritonFlashAttention")
_CALL = re.compile(r'stablehlo\.custom_call @([\w$.]+)\((.*?)$', re.M)
_TRITON_NAME = re.compile(r'name = "([^"]+)"')
_LOC_REF = re.compile(r'loc\((#loc\d+)\)')
_LOC_DEF = re.compile(r'^(#loc\d+) = (.*)$', re.M)
# A tokamax op call annotates its kernels with its op's JSON (`"op": {"__type": "tokamax....Class"`),
# in the call's frontend attributes (tokamax >= 0.0.17) or its named scope (0.0.12; the
# location, hence debug_info). JSON quotes print as \22 (\\22 inside an attribute string).
_TOKAMAX_OP = re.compile(r'op\\+22:\{\\+22__type\\+22:\\+22tokamax\.[\w.]*\.(\w+)\\+22')
_RAGGED_DOT = re.compile(r'\b(?:chlo|stablehlo|mhlo)\.ragged_dot\b')
_ALL_TO_ALL = re.compile(r'\bstablehlo\.all_to_all\b')


@contextlib.contextmanager
def cuda_cross_lowering(compute_capability: float = 9.0):
    """Trace and lower for an NVIDIA GPU of `compute_capability` on a host without one."""
    from pallas_kernels import cross_lowering

    tk = gpu_kernels.tokamax()
    from tokamax._src import gpu_utils  # noqa: E402  (private: see the module docstring)

    if not hasattr(gpu_utils, "_compute_capability"):
        raise RuntimeError("this tokamax has no gpu_utils._compute_capability; gpu_lowering supports the "
                           "tokamax pinned by setup.cfg's [gpu] extra")
    real = gpu_utils._compute_capability

    def capability(device=None):
        cc = real(device)
        return compute_capability if cc is None else cc

    absl_log = logging.getLogger("absl")
    with contextlib.ExitStack() as stack:
        # tokamax warns of an autotuning-cache miss per kernel: expected without a GPU.
        stack.callback(absl_log.setLevel, absl_log.level)
        absl_log.setLevel(logging.ERROR)
        stack.enter_context(gpu_kernels.targeting("gpu"))
        stack.enter_context(cross_lowering.as_gpu())
        stack.enter_context(tk.config.cross_compile(True))
        stack.enter_context(mock.patch.object(gpu_utils, "_compute_capability", capability))
        yield


def kernel_calls(text: str) -> list[str]:
    """Custom-call names in a lowered module (`as_text(debug_info=True)`), sorted, unique.

    A tokamax kernel is 'TARGET:op class' (e.g. 'mosaic_gpu_v2:PallasMosaicGpuRaggedDot'),
    another Triton kernel 'TARGET:kernel name' (e.g. the Pallas routing kernel's 'moe_route').
    """
    locs = dict(_LOC_DEF.findall(text))

    def annotation(rest: str, depth: int = 4) -> str:  # the call's line and its location chain
        refs = _LOC_REF.findall(rest) if depth else []
        return rest + "".join(annotation(locs.get(r, ""), depth - 1) for r in refs)

    names = set()
    for target, rest in _CALL.findall(text):
        ops = _TOKAMAX_OP.findall(annotation(rest))
        m = _TRITON_NAME.search(rest) if target == TRITON and not ops else None
        names.add(f"{target}:{ops[-1]}" if ops else f"{target}:{m.group(1)}" if m else target)
    return sorted(names)


def summarize(lowered) -> dict:
    text = lowered.as_text(debug_info=True)
    return {"custom_calls": kernel_calls(text), "ragged_dot_ops": len(_RAGGED_DOT.findall(text)),
            "all_to_all_ops": len(_ALL_TO_ALL.findall(text))}


def _abstract_batch(vocab: int, B: int, T: int) -> dict:
    del vocab
    i32 = lambda: jax.ShapeDtypeStruct((B, T), jnp.int32)  # noqa: E731
    return dict(tokens=i32(), targets=i32(), loss_mask=jax.ShapeDtypeStruct((B, T), jnp.float32),
                segment_ids=i32(), positions=i32())


def lower_train_step(cfg, devices: Optional[list] = None, batch: Optional[int] = None, seq: Optional[int] = None):
    """The `Lowered` train step of `cfg` (its mesh over `devices`) for "cuda"; nothing allocated."""
    from deepseek_jax import experiment, optim, sharding, train_step
    from deepseek_jax.model import Transformer

    devices = list(devices or jax.devices())
    model = Transformer(experiment.model_config(cfg))
    mesh = sharding.make_mesh(dict(cfg.mesh), devices)
    rules = sharding.logical_rules()
    optimizer = optim.make_optimizer(experiment.optimizer_config(cfg))
    B = batch or cfg.data.batch_size
    T = seq or cfg.data.seq_len
    B = max(B, sharding.data_parallel_size(mesh))
    step = train_step.make_train_step(model, train_step.bind_loss(cfg.loss, model, experiment.loss_config(cfg)),
                                      optimizer, mesh, rules, microbatches=cfg.get("microbatches", 1),
                                      bias_update_rate=cfg.moe.bias_update_rate, donate=False)
    with cuda_cross_lowering():
        state = train_step.abstract_train_state(model, optimizer, mesh, rules)
        return step.lower_abstract(state, _abstract_batch(model.config.vocab_size, B, T), platforms=("cuda",))


def lower_decode(cfg, batch: int = 2, prompt_len: int = 16, new_tokens: int = 4):
    """The `Lowered` Sampler.generate (prefill + the decode loop) of `cfg` for "cuda"."""
    from deepseek_jax import experiment, sharding
    from deepseek_jax.model import Transformer
    from deepseek_jax.rl.sampler import Sampler

    model = Transformer(experiment.model_config(cfg))
    sampler = Sampler(model, max_prompt_len=prompt_len, max_new_tokens=new_tokens)

    def generate(params, prompts_BxP, lengths_B, rng):
        return sampler.generate(params, prompts_BxP, rng, prompt_lengths=lengths_B).tokens

    with cuda_cross_lowering():
        params = nn.meta.unbox(sharding.abstract_params(model))
        args = (params, jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
                jax.ShapeDtypeStruct((batch,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)))
        return jax.jit(generate).trace(*args).lower(lowering_platforms=("cuda",))


def lower_for_cuda(cfg, devices: Optional[list] = None, batch: Optional[int] = None,
                   seq: Optional[int] = None, decode: bool = True) -> dict:
    """{"lowered", "custom_calls", "ragged_dot_ops"} of the train step (and decode) for "cuda".

    "lowered": both lowered without error (else "error" says why); "custom_calls": the
    kernels in either module; "ragged_dot_ops": ragged_dot ops left in them (must be 0).
    Per-program details under "train" and "decode".
    """
    out = {"lowered": False, "custom_calls": [], "ragged_dot_ops": 0}
    try:
        parts = {"train": summarize(lower_train_step(cfg, devices, batch, seq))}
        if decode:
            parts["decode"] = summarize(lower_decode(cfg))
    except Exception as e:  # reported, not raised: `plan --platform cuda --json` prints it
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        return out
    out.update(parts)
    out["lowered"] = True
    out["custom_calls"] = sorted(set().union(*(p["custom_calls"] for p in parts.values())))
    out["ragged_dot_ops"] = sum(p["ragged_dot_ops"] for p in parts.values())
    return out
