"""Model size and cost without allocating weights: parameters, FLOPs, KV cache.

    python -m deepseek_jax.inspect --config configs/deepseek_v3.py [--json] [--seq_len 4096]
    python -m deepseek_jax.inspect --config configs/tiny_v3.py --config.model.num_hidden_layers=4

Everything is read off the boxed parameter tree of `jax.eval_shape(model.init)`: shapes and
logical axis names (routed experts are the leaves with an `expert` axis), so the counts follow
the model code rather than a second formula.

Definitions (the keys of `model_stats`, also printed by `--json`):
  total_params      every parameter of the main model. Excluded: the MTP modules, and the V3
                    router bias `e_score_correction_bias` (a buffer in transformers, moved by
                    the balancing rule rather than by gradients), so the number equals
                    transformers' `sum(p.numel() for p in model.parameters())`.
  mtp_params        the MTP modules' own parameters; the embedding and output head they share
                    with the main model are not counted again.
  activated_params  the parameters one token uses: everything in total_params except the
                    routed experts it does not select, i.e. each MoE layer contributes
                    top-k of its E routed experts (plus router and shared experts). Embedding
                    and head are included.
  flops_per_token   training FLOPs (forward + backward) per token of a sequence of `seq_len`:
                        6 * matmul_params + 3 * L * H * (d_qk + d_v) * seq_len
                    matmul_params = activated_params minus the embedding lookup table (a
                    gather, not a matmul; when embeddings are tied it is the head and stays)
                    and minus the RMSNorm scales. The first term is the 6N rule (2 FLOPs per
                    multiply-add forward, twice that backward; Kaplan et al. 2020 §2.1). The
                    second is attention's scores q.k (d_qk = qk_nope + qk_rope for MLA, head_dim
                    for MHA/GQA) and the weighted value sum (d_v): a query at position t does
                    2 t (d_qk + d_v) FLOPs per head forward; the causal mean of t is
                    seq_len / 2, and forward + backward is 3x the forward. This is PaLM's
                    12 L H Q T (Chowdhery et al. 2022, Appendix B: d_qk = d_v = Q, no causal
                    mask) halved for the causal mask. With it DeepSeek-V3 at 4096 tokens comes
                    to 250.4 GFLOPs; "Insights into DeepSeek-V3" (ISCA'25, training-cost table)
                    gives 250. The MTP modules are left out (that figure matches without them);
                    their extra cost is `mtp_flops_per_token`.
  kv_cache_bytes_per_token  bf16 decode cache of the main model's layers: MLA caches the latent
                    and the shared RoPE key, (kv_lora_rank + qk_rope_head_dim) * L * 2 bytes
                    (V3: 70,272, the V3 paper's 70.272 KB); MHA/GQA caches K and V,
                    2 * kv_heads * head_dim * L * 2 bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

import flax.linen as nn
import jax

from deepseek_jax import layer_stack
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer
from deepseek_jax.sharding import abstract_params

BF16_BYTES = 2
# Parameters that are state, not weights: transformers registers it as a buffer.
BUFFER_NAMES = ("e_score_correction_bias",)


def abstract_param_tree(config: ModelConfig):
    """The boxed abstract parameter tree of `Transformer(config)` (ShapeDtypeStructs in
    LogicallyPartitioned boxes); allocates nothing.

    Tracing all 61 layers of V3 takes seconds, so one layer of each kind (dense, MoE) is
    traced and reused for every layer of that kind: `Transformer` builds layer i from
    (config, is_moe_layer(i)) alone. tests/test_inspect.py checks the result against the
    fully traced tree.
    """
    if layer_stack.stacks(config) is not None:  # scanned layers trace once per stack, whatever the depth
        return dict(abstract_params(Transformer(config), batch=1, length=1))
    kinds = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    distinct = sorted(set(kinds))  # [False], [True] or [False, True]
    small = config.replace(num_hidden_layers=len(distinct), first_k_dense_replace=int(False in distinct),
                           moe_layer_freq=1, scan_layers=False)  # per-layer templates (interleaved kinds)
    tree = dict(abstract_params(Transformer(small), batch=1, length=1))
    template = {kind: tree.pop(f"layers_{j}") for j, kind in enumerate(distinct)}
    tree.update({f"layers_{i}": template[kind] for i, kind in enumerate(kinds)})
    return tree


def _leaves(config: ModelConfig):
    """(path names, shape, logical axes) of every parameter."""
    boxed = abstract_param_tree(config)
    axes_tree = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_axes = jax.tree.leaves(axes_tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, leaf), axes in zip(flat_shapes, flat_axes):
        yield tuple(k.key for k in path), tuple(leaf.shape), tuple(axes)


def param_counts(config: ModelConfig) -> dict:
    """Parameter counts by role (see the module docstring for the definitions)."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    out = dict(total=0, mtp=0, activated=0, embedding=0, norm=0, mtp_activated=0, mtp_norm=0)
    for names, shape, axes in _leaves(config):
        if names[-1] in BUFFER_NAMES:
            continue
        n = math.prod(shape)
        # Routed expert weights are the leaves stacked over the logical `expert` axis.
        if "expert" in axes and n % E:
            raise ValueError(f"{'/'.join(names)} {shape} has an `expert` axis but is not a stack of "
                             f"{E} experts")
        used = n * K // E if "expert" in axes else n
        norm = n if names[-1] == "scale" else 0
        if names[0].startswith("mtp_"):
            out["mtp"] += n
            out["mtp_activated"] += used
            out["mtp_norm"] += norm
            continue
        out["total"] += n
        out["activated"] += used
        out["norm"] += norm
        if names == ("embed", "embedding"):
            out["embedding"] += n
    return out


def attention_flops_per_token(config: ModelConfig, seq_len: int, layers: int) -> int:
    """Causal attention scores + value sums, forward and backward: 3 L H (d_qk + d_v) T."""
    if config.attention == "mla":
        d_qk, d_v = config.qk_head_dim, config.v_head_dim
    else:
        d_qk = d_v = config.mha_head_dim
    return 3 * layers * config.num_attention_heads * (d_qk + d_v) * seq_len


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = BF16_BYTES) -> int:
    L = config.num_hidden_layers
    if config.attention == "mla":
        return (config.kv_lora_rank + config.qk_rope_head_dim) * L * bytes_per_value
    return 2 * config.kv_heads * config.mha_head_dim * L * bytes_per_value


def model_stats(config: ModelConfig, seq_len: int = 4096) -> dict:
    """The inspect numbers for `config` at training length `seq_len` (no weights allocated).

    Train code takes `flops_per_token` (+ `mtp_flops_per_token` when MTP is trained) for MFU.
    """
    c = param_counts(config)
    head = config.vocab_size * config.hidden_size
    # With tied embeddings the table is also the head matmul, so it stays in.
    lookup = 0 if config.tie_word_embeddings else c["embedding"]
    matmul = c["activated"] - lookup - c["norm"]
    # Each MTP depth runs its own block and eh_proj, then the shared head once more.
    mtp_matmul = c["mtp_activated"] - c["mtp_norm"] + config.num_mtp_layers * head
    mtp_attention = attention_flops_per_token(config, seq_len, config.num_mtp_layers)
    return dict(
        name=config.name,
        seq_len=seq_len,
        total_params=c["total"],
        mtp_params=c["mtp"],
        activated_params=c["activated"],
        flops_per_token=6 * matmul + attention_flops_per_token(config, seq_len, config.num_hidden_layers),
        mtp_flops_per_token=6 * mtp_matmul + mtp_attention,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(config),
    )


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_table(stats: dict) -> str:
    rows = [("model", stats["name"], ""), ("seq_len", f"{stats['seq_len']:,}", "")]
    for key, label in (("total_params", "total params (no MTP)"), ("mtp_params", "MTP params"),
                       ("activated_params", "activated params / token"),
                       ("flops_per_token", "train FLOPs / token"),
                       ("mtp_flops_per_token", "  + MTP FLOPs / token"),
                       ("kv_cache_bytes_per_token", "KV cache bytes / token (bf16)")):
        rows.append((label, f"{stats[key]:,}", _human(stats[key])))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m deepseek_jax.inspect",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="path.py[:arg]; add --config.key=value overrides")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seq_len", type=int, default=None, help="default: the config's data.seq_len")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; overrides look like --config.key=value")
    from deepseek_jax import experiment  # the ConfigDict only ever meets the entry point

    cfg = experiment.load_config(args.config, rest)
    seq_len = args.seq_len or int(cfg.data.seq_len)
    stats = model_stats(experiment.model_config(cfg), seq_len)
    print(json.dumps(stats) if args.json else format_table(stats))
    return stats


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as e:  # bad path, variant or override: no traceback
        sys.exit(f"inspect: {e}")
