"""Lower Pallas GPU kernels for "cuda" on a machine without a GPU (CI, a laptop).

JAX 0.10 lowers a Pallas-Triton `pallas_call` for `lowering_platforms=("cuda",)` on a CPU
host as it is. From JAX 0.11 the Triton lowering asks for the target GPU's compute
capability (`jax._src.pallas.triton.gpu_info.get_gpu_info`) and, with no GPU present,
raises "No supported GPU devices found, please specify an abstract GPU device using
AbstractDevice". Its public remedy, `jax.sharding.use_abstract_mesh` with an abstract GPU
device, cannot wrap a step that already runs under a concrete mesh (our train step and
its shard_map), so `as_gpu(kind)` answers that one question for the duration of a lowering
instead: the GPU is `kind` (default: H200). On a machine with a GPU it changes nothing.
Only lowering is meaningful under it; compiling still needs the real GPU.
"""
from __future__ import annotations

import contextlib
import importlib

DEFAULT_GPU = "NVIDIA H200"


def _gpu_info_module():
    try:  # JAX >= 0.11; absent (and unneeded) in 0.10
        return importlib.import_module("jax._src.pallas.triton.gpu_info")
    except ImportError:
        return None


@contextlib.contextmanager
def as_gpu(device_kind: str = DEFAULT_GPU):
    """Within this context, Pallas-Triton lowering targets `device_kind` when no GPU is present."""
    mod = _gpu_info_module()
    if mod is None:
        yield
        return
    versions = {v.value: v for v in mod.GpuVersion}
    if device_kind not in versions:
        raise ValueError(f"device_kind={device_kind!r}: this JAX knows {sorted(versions)}")
    original = mod.get_gpu_info

    def get_gpu_info():
        try:
            return original()  # a real GPU answers for itself
        except ValueError:
            return mod.get_gpu_info_from_version(versions[device_kind])

    mod.get_gpu_info = get_gpu_info
    try:
        yield
    finally:
        mod.get_gpu_info = original
