"""The XLA flags that make the suite's many tiny CPU programs compile fast, in one place:
conftest.py adds them for the pytest process (and every subprocess that inherits its
environment); tests that give a subprocess its own XLA_FLAGS take them from here.

Both change only how XLA:CPU generates code (the HLO passes and fusion decisions are the
same), and every tolerance holds with them.
"""
import importlib.metadata
import re

# LLVM's -O0 for the generated CPU code: compile time dominates the tiny programs.
OPT_LEVEL_0 = "--xla_backend_optimization_level=0"
# jaxlib 0.10 still has XLA:CPU's legacy fusion emitters beside the new MLIR ones; at -O0 they
# compile ~2x faster (tests/test_scan.py + test_bf16.py on an empty cache: 77 s -> 41 s).
# (At LLVM -O2 they are slower instead: 118 s.) Later jaxlibs have only the new emitters and
# abort on the flag as unknown.
LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("jaxlib"))[:2])


FAST_COMPILE = (OPT_LEVEL_0, LEGACY_EMITTERS) if _jaxlib_version() < (0, 11) else (OPT_LEVEL_0,)


def without(flags: str, *prefixes: str) -> str:
    """`flags` (an XLA_FLAGS string) without the flags that start with any of `prefixes`."""
    return " ".join(f for f in flags.split() if not f.startswith(prefixes))
