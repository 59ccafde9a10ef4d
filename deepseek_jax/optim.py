"""Optimizer and learning-rate schedules: AdamW as DeepSeek trains with it.

DeepSeek LLM / V2 / V3: AdamW with b1 0.9, b2 0.95, weight decay 0.1, gradient clipping
at global norm 1.0, linear warmup (2000 steps), then either the multi-step schedule
(DeepSeek LLM §2.3: 31.6% of the peak after 80% of the tokens, 10% after 90%) or, for V3,
constant + cosine decay, which `wsd` (warmup-stable-decay) approximates.

Weight decay is decoupled (Loshchilov & Hutter) and multiplied by the learning rate, as
in optax.adamw and PyTorch. It skips norm scales (`scale`), biases, and optionally the
embedding table. Leaves named in `frozen` (the V3 router bias `e_score_correction_bias`)
get no update at all: the aux-loss-free rule moves them outside the gradient step (V3
§2.1.2), so they have no optimizer state and do not count in the clipping norm.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "multistep", "wsd")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
NO_DECAY_NAMES = ("scale", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 3e-4  # peak
    schedule: str = "cosine"  # one of SCHEDULES
    warmup_steps: int = 0  # linear to the peak: peak * (step + 1) / warmup_steps
    total_steps: int = 10_000
    min_lr_ratio: float = 0.1  # final lr / peak for cosine and wsd
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0  # global-norm clipping; None or 0 disables it
    decay_embeddings: bool = True  # False also exempts leaves named `embedding`
    # multistep: the lr is multiplied by factors[i] from boundaries[i] * total_steps on.
    multistep_boundaries: tuple[float, ...] = (0.8, 0.9)
    multistep_factors: tuple[float, ...] = (0.316, 0.1)
    # wsd: the last wsd_decay_fraction of total_steps decays to min_lr_ratio * peak.
    wsd_decay_fraction: float = 0.1
    wsd_decay_shape: str = "linear"  # one of WSD_SHAPES ("1-sqrt": Hägele et al. 2024)
    frozen: tuple[str, ...] = ("e_score_correction_bias",)  # leaf names the optimizer never moves

    def __post_init__(self):
        def check(ok, field, fix):
            if not ok:
                raise ValueError(f"optimizer.{field}={getattr(self, field)!r}: {fix}")

        check(self.name == "adamw", "name", "only 'adamw' is implemented")
        check(self.schedule in SCHEDULES, "schedule", f"use one of {SCHEDULES}")
        check(self.learning_rate >= 0, "learning_rate", "must be >= 0")
        check(self.total_steps > 0, "total_steps", "must be positive")
        check(0 <= self.warmup_steps <= self.total_steps, "warmup_steps",
              f"must be between 0 and total_steps={self.total_steps}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.clip_norm is None or self.clip_norm >= 0, "clip_norm",
              "use None, 0 (off) or a positive norm")
        check(len(self.multistep_boundaries) == len(self.multistep_factors), "multistep_factors",
              f"needs one factor per boundary; boundaries are {self.multistep_boundaries}")
        check(list(self.multistep_boundaries) == sorted(self.multistep_boundaries)
              and all(0 < b <= 1 for b in self.multistep_boundaries), "multistep_boundaries",
              "must be increasing fractions of total_steps in (0, 1]")
        check(0 < self.wsd_decay_fraction <= 1, "wsd_decay_fraction", "must be in (0, 1]")
        check(self.wsd_decay_shape in WSD_SHAPES, "wsd_decay_shape", f"use one of {WSD_SHAPES}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OptimizerConfig":
        """Build from a dict or ml_collections ConfigDict; lists become tuples."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown OptimizerConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _coerce(cfg) -> OptimizerConfig:
    return cfg if isinstance(cfg, OptimizerConfig) else OptimizerConfig.from_dict(cfg)


def make_schedule(cfg) -> optax.Schedule:
    """step -> learning rate: linear warmup (peak * (step + 1) / W), then the configured shape."""
    cfg = _coerce(cfg)
    peak, W, S, m = cfg.learning_rate, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio

    def after_warmup(step):
        if cfg.schedule == "constant":
            return jnp.full_like(step, peak)
        if cfg.schedule == "cosine":
            p = jnp.clip((step - W) / max(S - W, 1), 0.0, 1.0)
            return peak * (m + (1 - m) * 0.5 * (1 + jnp.cos(math.pi * p)))
        if cfg.schedule == "multistep":
            factor = jnp.ones_like(step)
            for b, f in zip(cfg.multistep_boundaries, cfg.multistep_factors):
                factor = jnp.where(step >= round(b * S), f, factor)
            return peak * factor
        # wsd: stable at the peak, then decay over the last steps.
        start = S - round(cfg.wsd_decay_fraction * S)
        p = jnp.clip((step - start) / max(S - start, 1), 0.0, 1.0)
        shape = {"linear": p, "cosine": 0.5 * (1 - jnp.cos(math.pi * p)), "1-sqrt": jnp.sqrt(p)}
        return peak * (1 - (1 - m) * shape[cfg.wsd_decay_shape])

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        # The first update (step 0) already moves: peak / W, reaching the peak at step W - 1
        # (from 0 it would spend the first update at lr 0).
        warm = peak * (step + 1) / W if W else jnp.full_like(step, peak)
        return jnp.where(step < W, warm, after_warmup(step))

    return schedule


def _leaf_name(path) -> str:
    # The last dict key names the parameter; flax's Partitioned boxes add a `.value` after it.
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def param_labels(params, cfg) -> Any:
    """Pytree of "frozen" | "train" labels for optax.multi_transform."""
    frozen = set(_coerce(cfg).frozen)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _leaf_name(path) in frozen else "train", params)


def decay_mask(params, cfg) -> Any:
    """Pytree of bools: True where decoupled weight decay applies.

    Exempt: norm scales and biases (by name, and any leaf with fewer than 2 dims), and the
    embedding table when decay_embeddings is False.
    """
    cfg = _coerce(cfg)
    exempt = set(NO_DECAY_NAMES) | set(cfg.frozen) | (set() if cfg.decay_embeddings else {"embedding"})

    def decays(path, x):
        name = _leaf_name(path)
        return name not in exempt and not name.endswith("_bias") and jnp.ndim(x) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (masked decay) on trainable leaves; frozen leaves get 0."""
    cfg = _coerce(cfg)
    train = []
    if cfg.clip_norm:
        # Inside the trainable branch, so the frozen router bias never enters the norm.
        train.append(optax.clip_by_global_norm(cfg.clip_norm))
    train.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=functools.partial(decay_mask, cfg=cfg)))
    return optax.multi_transform({"train": optax.chain(*train), "frozen": optax.set_to_zero()},
                                 functools.partial(param_labels, cfg=cfg))
