"""Test harness: 8 virtual CPU devices, float32, and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so it is done at the very top.
"""
import os

from tests.xla_flags import FAST_COMPILE  # imports no jax

# FAST_COMPILE: LLVM -O0 (and jaxlib 0.10's legacy fusion emitters) for the many tiny programs
# the tests compile; every tolerance held in a trial. Subprocesses inherit it through os.environ.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", *FAST_COMPILE]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")

# `make test` runs whole files per worker (xdist --dist loadfile: a file's module fixtures and
# compiled steps are built once, not once per worker) and hands them out in collection order.
# The slowest files go first, so no worker is left finishing a long file alone at the end.
SLOW_FILES_FIRST = (  # by worker-seconds in a clean-clone run (--durations=0), slowest first
    "test_notebooks.py", "test_cli_loop.py", "test_train_step.py", "test_multihost.py", "test_trainer.py",
    "test_bench_smoke.py", "test_moe.py", "test_speculative.py", "test_post_train.py", "test_grpo.py",
    "test_bench_decode_smoke.py", "test_scan.py", "test_hf_parity.py", "test_bf16.py",
    "test_blockwise_attention.py", "test_decode.py", "test_losses.py", "test_sampler.py", "test_gpu_lowering.py",
    "test_chunked_xent.py", "test_configs_all.py", "test_router_replay.py", "test_pallas_routing.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within
