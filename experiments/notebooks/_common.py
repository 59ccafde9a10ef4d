"""Helpers shared by the ablation notebooks: run setup, reading metrics.jsonl, plotting.

Only bookkeeping lives here; every model, loss, trainer and sampler call goes to the
`deepseek_jax` library itself. Environment variables (tests/test_notebooks.py sets them):

    DSJ_NOTEBOOK_SCALE    multiplies training steps (default 1.0; the test uses ~0.1)
    DSJ_NOTEBOOK_WORKDIR  where runs go (default REPO/runs/notebooks/NOTEBOOK)
    DSJ_NOTEBOOK_FIGURES  where PNGs go (default ./figures, next to the notebook)
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time
from typing import Iterable, Optional

import numpy as np

import deepseek_jax

REPO = pathlib.Path(deepseek_jax.__file__).resolve().parents[1]


def scale() -> float:
    return float(os.environ.get("DSJ_NOTEBOOK_SCALE", "1.0"))


def scaled(n: int, s: float, minimum: int = 4) -> int:
    """`n * s` rounded, at least `minimum` (a tiny SCALE still takes a few real steps)."""
    return max(minimum, int(round(n * s)))


def setup() -> None:
    """Persistent XLA compilation cache (re-runs skip compiling) and quieter logs."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    for name in ("absl", "jax", "orbax", "deepseek_jax"):
        logging.getLogger(name).setLevel(logging.ERROR)


def workdir(notebook: str, run: str) -> str:
    """A fresh directory for one run (an old one is removed: the trainer would resume it)."""
    root = os.environ.get("DSJ_NOTEBOOK_WORKDIR") or str(REPO / "runs" / "notebooks" / notebook)
    path = os.path.join(root, run)
    shutil.rmtree(path, ignore_errors=True)
    return path


def read_metrics(path: str) -> list[dict]:
    """The records of `path/metrics.jsonl` (or of the file `path` itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have `key`."""
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if not pts:
        return np.zeros(0, int), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s), np.asarray(v, np.float64)


def smooth(values: np.ndarray, window: int = 3) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def tail_mean(rows: list[dict], key: str, n: int = 3) -> float:
    """Mean of the last `n` logged values of `key` (less noisy than the last one)."""
    _, v = series(rows, key)
    return float(np.mean(v[-n:])) if len(v) else float("nan")


def layer_keys(rows: list[dict], stat: str = "cv") -> list[str]:
    """The per-layer expert-load keys the trainer wrote (moe/layer{l}/{stat}), in layer order."""
    keys = {k for r in rows for k in r if k.startswith("moe/layer") and k.endswith("/" + stat)}
    return sorted(keys, key=lambda k: int(k.split("/")[1].removeprefix("layer")))


def figures_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("DSJ_NOTEBOOK_FIGURES", "figures"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(fig, name: str) -> str:
    """Saves `fig` as figures/NAME.png and returns the path."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)


class Timer:
    """Wall seconds per labelled block: `with timer("MLA"): ...`; `timer.table()`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._label: Optional[str] = None

    def __call__(self, label: str):
        self._label = label
        return self

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds[self._label] = time.perf_counter() - self._t0
        return False

    def table(self) -> str:
        return "\n".join(f"{k:32s} {v:7.1f} s" for k, v in self.seconds.items())
