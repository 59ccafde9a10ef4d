"""Scanned layer stacks (ModelConfig.scan_layers): which layers form them, and the two layouts.

Dimension legend: L layers in a stack, E routed experts.

With `scan_layers`, `Transformer` runs its layers as at most two `nn.scan` stacks: the dense
prefix (the first `first_k_dense_replace` layers, or every layer of a dense model) and the
MoE layers after it. Their parameters carry a leading layer axis (logical name "layers"):

    per-layer layout (scan_layers=False; Hugging Face import/export, inspect):
        layers_0/..., layers_1/..., ...                each leaf [...]
    scanned layout (scan_layers=True):
        dense_layers/...  (layers 0 .. k-1)            each leaf [k, ...]
        moe_layers/...    (layers k .. L-1)            each leaf [L - k, ...]

`stack_layers` / `unstack_layers` convert a parameter tree (or any tree keyed like one, such
as optimizer moments) between the two; MTP modules (`mtp_k`) and everything else are left
alone. A layout that is not two contiguous runs (moe_layer_freq > 1 interleaves dense and
MoE layers) cannot be scanned: `stacks` returns None and the model keeps its Python loop.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig

DENSE_STACK, MOE_STACK = "dense_layers", "moe_layers"
STACK_NAMES = (DENSE_STACK, MOE_STACK)


class Stack(NamedTuple):
    name: str  # DENSE_STACK | MOE_STACK
    first: int  # index of its first layer
    count: int  # number of layers
    moe: bool


def contiguous_stacks(config: ModelConfig) -> Optional[tuple[Stack, ...]]:
    """The stacks the layer kinds split into (dense first, then MoE), or None if interleaved."""
    kinds = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    n_dense = kinds.count(False)
    if kinds != [False] * n_dense + [True] * (len(kinds) - n_dense):
        return None
    out = []
    if n_dense:
        out.append(Stack(DENSE_STACK, 0, n_dense, False))
    if len(kinds) > n_dense:
        out.append(Stack(MOE_STACK, n_dense, len(kinds) - n_dense, True))
    return tuple(out)


def stacks(config: ModelConfig) -> Optional[tuple[Stack, ...]]:
    """The scanned stacks `Transformer(config)` runs, or None when it runs a per-layer loop
    (scan_layers=False, or interleaved dense/MoE layers that do not split into two runs)."""
    return contiguous_stacks(config) if config.scan_layers else None


def is_stacked(tree) -> bool:
    return any(name in tree for name in STACK_NAMES)


def _stack(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)  # host arrays stay on the host (Hugging Face import)
    return jnp.stack(leaves)


def stack_layers(tree, config: ModelConfig):
    """Per-layer tree (layers_i) -> the layout `Transformer(config)` uses.

    Unchanged when `config` runs the per-layer loop or the tree is already stacked.
    """
    groups = stacks(config)
    if groups is None or is_stacked(tree):
        return tree
    missing = [f"layers_{i}" for i in range(config.num_hidden_layers) if f"layers_{i}" not in tree]
    if missing:
        raise ValueError(f"stack_layers: the tree lacks {missing[:3]}...; expected the per-layer layout "
                         f"of a {config.num_hidden_layers}-layer model")
    out = {k: v for k, v in tree.items() if not (k.startswith("layers_") and k[7:].isdigit())}
    for g in groups:
        layers = [tree[f"layers_{i}"] for i in range(g.first, g.first + g.count)]
        out[g.name] = jax.tree.map(lambda *xs: _stack(list(xs)), *layers)
    return out


def unstack_layers(tree, config: ModelConfig):
    """Scanned tree (dense_layers / moe_layers) -> the per-layer layout (layers_i).

    Unchanged when the tree holds no stacks. Works whatever `config.scan_layers` says, so a
    scanned checkpoint can be read by a per-layer model.
    """
    if not is_stacked(tree):
        return tree
    groups = contiguous_stacks(config)
    names = [g.name for g in groups or ()]
    if sorted(names) != sorted(k for k in tree if k in STACK_NAMES):
        raise ValueError(f"unstack_layers: the tree holds stacks {sorted(k for k in tree if k in STACK_NAMES)} "
                         f"but this config's layers split into {names}; pass the model's own config")
    out = {k: v for k, v in tree.items() if k not in STACK_NAMES}
    for g in groups:
        for j in range(g.count):
            out[f"layers_{g.first + j}"] = jax.tree.map(lambda x, j=j: x[j], tree[g.name])
    return out


def to_layout(tree, config: ModelConfig):
    """`tree` in whichever layout (per-layer or scanned) converted to the one `config` runs."""
    return stack_layers(tree, config) if stacks(config) is not None else unstack_layers(tree, config)
