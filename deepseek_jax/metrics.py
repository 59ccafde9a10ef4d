"""Run metrics: DIR/metrics.jsonl, TensorBoard (tensorboardX) under DIR/tb/, MFU, expert load.

metrics.jsonl holds one JSON object per logged step, `{"step": s, "loss": ..., ...}`, where
`s` counts optimizer steps taken (the state's step after the update). Keys the trainer
writes: loss, learning_rate, grad_norm, tokens_per_s, mfu, skipped, skipped_total,
everything scalar the loss returns (ce, accuracy, mtp_ce, moe/...), the expert-load
statistics below, data/* counters, and eval/* at evaluation steps.

Expert load (V3 §2.1.2 balances it; REFERENCES.md pitfall 7 asks for the drop rate): from
the step's `moe/expert_counts` [L, E] (routed token-slots per expert per MoE layer),

    moe/layer{l}/max_over_mean = max_e c[l, e] / mean_e c[l, e]   (1.0 = perfectly balanced)
    moe/layer{l}/cv            = std_e c[l, e] / mean_e c[l, e]   (coefficient of variation)
    moe/max_over_mean, moe/cv  = the same, averaged over layers
    moe/drop_rate              = dropped slots / routed slots, all layers together

TensorBoard gets the same scalars, a histogram of each layer's load fractions, and a
layer x expert heatmap image. The image is encoded here (a few lines of PNG) instead of
through matplotlib/PIL, to keep both out of the dependencies.

Only process 0 writes (STYLE.md rule 12): a writer made on another process is a no-op.
On resume, records after the restored step are dropped from metrics.jsonl and TensorBoard
is told to purge them, so a run interrupted after its last checkpoint logs every step once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
import zlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# ----- expert load ---------------------------------------------------------------------------


def expert_load_stats(counts_LxE, dropped: Optional[float] = None) -> dict[str, float]:
    """Balance statistics of routed token-slots per layer and expert (module docstring)."""
    c = np.asarray(counts_LxE, np.float64)
    if c.ndim != 2 or c.size == 0:
        return {}
    mean = c.mean(axis=1)
    safe = np.where(mean > 0, mean, 1.0)
    max_over_mean = np.where(mean > 0, c.max(axis=1) / safe, 0.0)
    cv = np.where(mean > 0, c.std(axis=1) / safe, 0.0)
    out = {}
    for layer in range(c.shape[0]):
        out[f"moe/layer{layer}/max_over_mean"] = float(max_over_mean[layer])
        out[f"moe/layer{layer}/cv"] = float(cv[layer])
    out["moe/max_over_mean"] = float(max_over_mean.mean())
    out["moe/cv"] = float(cv.mean())
    if dropped is not None:
        routed = c.sum()
        out["moe/drop_rate"] = float(dropped) / routed if routed > 0 else 0.0
    return out


# ----- images --------------------------------------------------------------------------------

# A perceptually ordered dark-blue -> teal -> yellow ramp (viridis' anchor colours).
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def colormap(x) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB by linear interpolation along _RAMP."""
    x = np.clip(np.nan_to_num(np.asarray(x, np.float64)), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def encode_png(rgb_HxWx3: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (filter type 0 on every row, one zlib IDAT chunk)."""
    rgb = np.ascontiguousarray(rgb_HxWx3, np.uint8)
    h, w, channels = rgb.shape
    if channels != 3:
        raise ValueError(f"encode_png wants [H, W, 3] uint8, got shape {rgb.shape}")
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def load_heatmap(counts_LxE, cell: int = 12) -> np.ndarray:
    """[L*cell, E*cell, 3] image of each expert's load relative to its layer's mean.

    Colour = load / (2 * mean) clipped to [0, 1]: the middle of the ramp is a perfectly
    balanced expert, the dark end an idle one, yellow one with twice its share or more.
    """
    c = np.asarray(counts_LxE, np.float64)
    mean = c.mean(axis=1, keepdims=True)
    rel = np.where(mean > 0, c / (2 * np.where(mean > 0, mean, 1.0)), 0.0)
    img = colormap(rel)
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


# ----- FLOPs and MFU -------------------------------------------------------------------------


def _local_flops_per_token(model_cfg, seq_len: int) -> float:
    """Fallback training FLOPs per token when `deepseek_jax.inspect` is missing:
    6 x activated matmul parameters + causal attention, inspect.py's conventions.

    Activated parameters: every matrix except the input embedding table (a lookup), with
    routed experts counted K/E of the time; MTP modules run in training, so they count.
    Attention adds 3 * layers * heads * (d_qk + d_v) * T per token (scores and values,
    forward + backward, halved for the causal mask). Unlike inspect it does not count the
    shared output head a second time for each MTP depth.
    """
    from deepseek_jax import sharding  # local: keeps this module importable without flax models
    from deepseek_jax.model import Transformer
    import flax.linen as nn

    # The per-layer layout: the shape rules below read one layer's leaves (no scanned [L] axis).
    params = nn.meta.unbox(sharding.abstract_params(Transformer(model_cfg.replace(scan_layers=False))))
    frac = (model_cfg.num_experts_per_tok / model_cfg.n_routed_experts) if model_cfg.n_routed_experts else 1.0
    n = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(p, "key", p)) for p in path]
        if len(leaf.shape) < 2 or keys[-1] == "embedding":
            continue
        routed = model_cfg.n_routed_experts and len(leaf.shape) == 3 and keys[-1] in ("gate_proj", "up_proj", "down_proj")
        n += math.prod(leaf.shape) * (frac if routed else 1.0)
    if model_cfg.attention == "mla":
        d_qk, d_v = model_cfg.qk_head_dim, model_cfg.v_head_dim
    else:
        d_qk = d_v = model_cfg.mha_head_dim
    layers = model_cfg.num_hidden_layers + model_cfg.num_mtp_layers
    return 6.0 * n + 3.0 * layers * model_cfg.num_attention_heads * (d_qk + d_v) * seq_len


def model_flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token, MTP modules included: `deepseek_jax.inspect.model_stats`
    (flops_per_token + mtp_flops_per_token), or the local fallback above."""
    try:
        from deepseek_jax import inspect as ds_inspect
        stats = ds_inspect.model_stats(model_cfg, seq_len=seq_len)
    except (ImportError, AttributeError):
        return _local_flops_per_token(model_cfg, seq_len)
    return float(stats["flops_per_token"] + stats.get("mtp_flops_per_token", 0))


def measure_peak_flops(devices=None, dtype=jnp.float32, n: Optional[int] = None, reps: int = 3) -> float:
    """Achievable matmul FLOP/s of `devices` together (best of `reps` timed runs).

    Measured rather than looked up: CPU "devices" share cores and GPUs differ by clocks;
    one batched matmul with the batch split across the devices measures them together.
    """
    devices = list(devices or jax.local_devices())
    if n is None:
        n = 512 if devices[0].platform == "cpu" else 8192
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.device_put(jnp.ones((len(devices), n, n), dtype), sh)
    f = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a, preferred_element_type=jnp.float32),
                out_shardings=sh)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * len(devices) * n**3 / best


# ----- writer --------------------------------------------------------------------------------


def _scalar(v) -> Optional[float]:
    a = np.asarray(v)
    if a.ndim != 0 or a.dtype.kind not in "biuf":  # bool, int, unsigned, float
        return None
    return float(a)


def scalars_only(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict, as Python floats (arrays are left out)."""
    out = {}
    for k, v in metrics.items():
        s = _scalar(v)
        if s is not None:
            out[k] = s
    return out


def truncate_jsonl(path: str, last_step: int) -> int:
    """Drops records with step > last_step (a resumed run logs them again); returns kept count."""
    if not os.path.exists(path):
        return 0
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line half-written when the process was killed
            if record.get("step", -1) <= last_step:
                kept.append(line.rstrip("\n"))  # verbatim: the logged values stay bit-exact
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in kept)
    os.replace(tmp, path)
    return len(kept)


class MetricsWriter:
    """metrics.jsonl + TensorBoard for one workdir. A no-op on processes other than 0."""

    def __init__(self, workdir: str, *, resume_step: Optional[int] = None, enabled: Optional[bool] = None,
                 tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in a reused workdir starts a fresh log
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # TensorBoard hides older events at or after the purge step: those of the steps
            # being redone, or of an earlier run in a reused workdir.
            purge = resume_step + 1 if resume_step is not None else 0
            # max_queue=0: an unbounded queue. tensorboardX writes from a thread that dies on an
            # OSError (a full disk); with its default 10-event queue the next adds then blocked
            # forever and the run hung instead of reaching the checkpoint save that reports the
            # disk (exit 3).
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge, flush_secs=30, max_queue=0)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Appends one record (scalars only) and mirrors it to TensorBoard; returns it."""
        record = {"step": int(step), **{k: v for k, v in scalars_only(metrics).items() if k != "step"}}
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every line it logged
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(step))
        return record

    def write_expert_load(self, step: int, counts_LxE) -> None:
        """Histograms of each layer's load fractions and the layer x expert heatmap."""
        if not self.enabled or self._tb is None:
            return
        c = np.asarray(counts_LxE, np.float64)
        frac = c / np.clip(c.sum(axis=1, keepdims=True), 1.0, None)
        for layer in range(c.shape[0]):
            self._tb.add_histogram(f"moe/load/layer{layer}", frac[layer], int(step))
        self.write_image(step, "moe/expert_load_heatmap", load_heatmap(c))

    def write_image(self, step: int, tag: str, rgb_HxWx3: np.ndarray) -> None:
        if not self.enabled or self._tb is None:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        h, w, _ = rgb_HxWx3.shape
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=encode_png(rgb_HxWx3))
        self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), int(step))

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                try:
                    self._tb.close()
                except OSError as e:  # e.g. a full disk: reported by the checkpoint save, not masked here
                    log.warning("TensorBoard events in %s were not all written: %s", self._tb.logdir, e)
