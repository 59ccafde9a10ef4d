"""The DeepSeek Transformer (V1 dense, V2/V3 MLA + MoE) with Multi-Token Prediction modules.

Dimension legend: B batch, T time, D model width, V vocabulary, L layers, E routed experts.

Usage:
    model = Transformer(config)
    params = model.init(rng, tokens)["params"]
    out = model.apply({"params": params}, tokens)      # out.logits [B, T, V]

    # Generation with a KV cache (kv_cache.py; rl/sampler.py wraps it in a decode loop):
    cache = kv_cache.init_cache(config, batch=B, max_len=S)
    out, cache = model.apply({"params": params}, prompt_BxP, segment_ids=valid_BxP, cache=cache)
    out, cache = model.apply({"params": params}, next_Bx1, cache=cache)   # absorbed MLA decode

Parameter tree (names chosen to map one to one onto the Hugging Face checkpoints):
    embed/embedding [V, D]
    layers_{i}/attn_norm, attn/{q_proj | q_a_proj, q_a_norm, q_b_proj}, kv_a_proj, kv_a_norm,
               kv_b_proj [C, H, N+A], o_proj [H, A, D]     (MLA; MHA has q/k/v/o_proj)
              mlp_norm, mlp/{gate_proj, up_proj, down_proj}                       (dense)
                        mlp/{router [D, E], e_score_correction_bias [E],
                             gate_proj [E, D, F], up_proj, down_proj, shared_experts/...}  (MoE)
    final_norm, lm_head/kernel [D, V]
    mtp_{k}/enorm, hnorm, eh_proj [2D, D], block/..., final_norm   (V3 §2.2)

With `config.scan_layers`, layers_{i} become two scanned stacks, dense_layers/... and
moe_layers/..., each leaf with a leading [L] layer axis (layer_stack.py converts both ways).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import kv_cache, layer_stack
from deepseek_jax.attention import MHA, MLA, PrefillMask, attention_mask
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, Dense, Embed, RMSNorm, constrain, rope_cos_sin
from deepseek_jax.moe import MoE
from deepseek_jax.outputs import ModelOutput, MoEStats


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(norm(x)), then + FFN(norm(.)) (MLP or MoE)."""

    config: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask, valid_BxT, cache=None, index=None, absorbed=True,
                 forced_ids_BxTxK=None):
        """(x, MoE stats), plus the updated layer cache when `cache` is given.
        forced_ids_BxTxK: router replay for an MoE block (moe.route; -1 = route normally)."""
        c = self.config
        attn_cls = MLA if c.attention == "mla" else MHA
        x_norm = RMSNorm(c.rms_norm_eps, name="attn_norm")(x_BxTxD)
        if cache is None:
            h = attn_cls(c, name="attn")(x_norm, cos, sin, mask)
        else:
            h, cache = attn_cls(c, name="attn")(x_norm, cos, sin, mask, cache, index, absorbed)
        x_BxTxD = constrain(x_BxTxD + h, ("batch", "length", "embed"))
        y = RMSNorm(c.rms_norm_eps, name="mlp_norm")(x_BxTxD)
        if self.moe:
            y, stats = MoE(c, name="mlp")(y, valid_BxT, forced_ids_BxTxK)
        else:
            y, stats = MLP(c.hidden_size, c.intermediate_size, jnp.dtype(c.dtype), name="mlp")(y), None
        x_BxTxD = constrain(x_BxTxD + y, ("batch", "length", "embed"))
        return (x_BxTxD, stats) if cache is None else (x_BxTxD, stats, cache)


def _block_cls(config: ModelConfig):
    if config.remat == "none":
        return Block
    policy = None if config.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return nn.remat(Block, policy=policy, static_argnums=())


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth (DeepSeek-V3 §2.2, eq. 21-23).

    h'_i = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then one Transformer block. The
    concatenation order (embedding first) is the released checkpoints' (`eh_proj`), as run by
    vLLM and SGLang; the paper's equation lists the hidden state first.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, h_prev_BxTxD, emb_next_BxTxD, cos, sin, mask, valid_BxT, cache=None, index=None,
                 absorbed=True):
        """(h, final_norm(h), MoE stats), plus the block's updated layer cache when `cache` is
        given (speculative decoding drafts with MTP through its own KV cache, rl/speculative.py)."""
        c = self.config
        D = c.hidden_size
        e = RMSNorm(c.rms_norm_eps, name="enorm")(emb_next_BxTxD)
        h = RMSNorm(c.rms_norm_eps, name="hnorm")(h_prev_BxTxD)
        h = Dense((2 * D,), (D,), ("mlp", "embed"), jnp.dtype(c.dtype), name="eh_proj")(
            jnp.concatenate([e, h], axis=-1))
        if cache is None:
            h, stats = _block_cls(c)(c, c.is_moe, name="block")(h, cos, sin, mask, valid_BxT)
            return h, RMSNorm(c.rms_norm_eps, name="final_norm")(h), stats
        h, stats, cache = Block(c, c.is_moe, name="block")(h, cos, sin, mask, valid_BxT, cache, index, absorbed)
        return h, RMSNorm(c.rms_norm_eps, name="final_norm")(h), stats, cache


class _Stacked(dict):
    """MoE stats of a scanned stack: every entry already has a leading [L] layer axis."""


def _stack_stats(stats: list) -> Optional[MoEStats]:
    """Per-layer stats dicts (and `_Stacked` ones from a scanned stack), in layer order ->
    MoEStats with a leading layer axis."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    stack = lambda k: jnp.concatenate([s[k] if isinstance(s, _Stacked) else s[k][None] for s in stats])
    first = stats[0]["tokens"]
    return MoEStats(
        counts=stack("counts"), probs=stack("probs"), router_z=stack("router_z"),
        tokens=first[0] if isinstance(stats[0], _Stacked) else first, dropped=stack("dropped"),
        group_tokens=stack("group_tokens"), seq_balance=stack("seq_balance"), expert_ids=stack("expert_ids"))


def _scan(body, block: nn.Module, count: int, x_BxTxD: jax.Array, xs=None):
    """`body(block, x, xs_i) -> (x, ys_i)` over `count` layers: (x, ys stacked over layers).

    `block` holds the layers' parameters with a leading layer axis (logical name "layers",
    layer_stack.py); one traced layer serves them all, so compile time does not grow with depth.
    """
    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=count,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    return scan(block, x_BxTxD, xs)


def shift_left(x_BxT: jax.Array, fill: int = 0) -> jax.Array:
    """x[:, t + 1] at position t (the last position gets `fill`)."""
    return jnp.concatenate([x_BxT[:, 1:], jnp.full_like(x_BxT[:, :1], fill)], axis=1)


class Transformer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, cache: Optional[kv_cache.KVCache] = None,
                 absorbed: bool = True, return_hidden: bool = False, expert_ids: Optional[jax.Array] = None,
                 prefill: bool = False):
        """ModelOutput; with `cache`, (ModelOutput, updated cache) for prefill / decode.

        `expert_ids` [B, T, L, K] int32 (no cache; L = the main model's MoE layers in order):
        router replay (grpo.router_replay). Token (b, t) goes to experts expert_ids[b, t, l] in
        MoE layer l, gates recomputed from the current router logits (moe.forced_gates); rows of
        -1 (prompt padding, unrecorded tokens) route normally, as do the MTP modules. The
        experts every token went to come back in `moe.expert_ids` [L (+ MTP), B, T, K].

        `return_hidden=True` (training losses, no cache) skips the output head: logits and
        mtp_logits are None, and `hidden`, `mtp_hidden` and `head_kernel` let the loss apply
        the head chunk by chunk (chunked_xent.map_head) without a [B, T, V] array.

        With a cache, `tokens` are appended at the cache's write index; `segment_ids` (0 =
        left padding) marks which are real, positions come from the cache (`positions` must be
        None), and MTP modules are skipped (`mtp_logits` is None): their input needs the token
        after each position, which generation does not know yet. `absorbed` picks MLA's
        absorbed (default) or naive expanded decode; both give the same logits. `prefill=True`:
        the cache is empty (index 0, fresh from kv_cache.init_cache) and the tokens attend among
        themselves with attention_impl's kernel (blockwise on CPU, flash on GPU) rather than over
        every slot under a [B, 1, T, S] mask; the same logits and cache.
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        B, T = tokens_BxT.shape
        valid_BxT = None if segment_ids is None else segment_ids != 0
        n_moe = sum(map(c.is_moe_layer, range(c.num_hidden_layers)))
        if expert_ids is not None and (cache is not None or expert_ids.shape != (B, T, n_moe, c.num_experts_per_tok)):
            raise ValueError(f"expert_ids has shape {expert_ids.shape}; router replay needs [B, T, MoE layers, K] = "
                             f"{(B, T, n_moe, c.num_experts_per_tok)} and no cache (the training forward)")
        if prefill and (cache is None or (not isinstance(cache.index, jax.core.Tracer)
                                          and int(jnp.max(cache.index)) != 0)):
            raise ValueError("prefill=True needs an empty cache (kv_cache.init_cache, write index 0); "
                             "append to a filled cache with prefill=False")
        if cache is not None:
            if positions is not None:
                raise ValueError("Transformer(cache=...) derives positions from the cache (real tokens per row); "
                                 "pass positions=None and mark left padding with segment_ids=0")
            kv_cache.check_room(cache, T)
            index = cache.index
            cache, positions, mask = kv_cache.append(cache, jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT)
            if prefill:  # the T tokens attend among themselves, with attention_impl's kernel
                mask = PrefillMask(attention_mask(None if valid_BxT is None else valid_BxT.astype(jnp.int32), T,
                                                  c.attention_impl))
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rope_cos_sin(positions, c)
        if cache is None:
            mask = attention_mask(segment_ids, T, c.attention_impl)

        embed = Embed(c.vocab_size, c.hidden_size, dt, name="embed")
        x = constrain(embed(tokens_BxT), ("batch", "length", "embed"))
        block_cls = _block_cls(c)
        stats, layer_caches = [], []
        groups = layer_stack.stacks(c)
        for g in groups or ():
            if cache is None:  # router replay: each MoE layer's forced ids are the scan's xs
                body = lambda blk, x_BxTxD, ids: blk(x_BxTxD, cos, sin, mask, segment_ids, None, None, True, ids)
                xs = jnp.moveaxis(expert_ids, 2, 0) if (g.moe and expert_ids is not None) else None
                x, s = _scan(body, block_cls(c, g.moe, name=g.name), g.count, x, xs)
            else:  # the cache stays per layer (kv_cache.KVCache): stacked for the scan, split after
                def body(blk, x_BxTxD, layer):
                    x_BxTxD, s, layer = blk(x_BxTxD, cos, sin, mask, valid_BxT, layer, index, absorbed)
                    return x_BxTxD, (s, layer)
                stacked = jax.tree.map(lambda *a: jnp.stack(a), *cache.layers[g.first:g.first + g.count])
                x, (s, layers) = _scan(body, Block(dropless_config(c), g.moe, name=g.name), g.count, x, stacked)
                layer_caches += [jax.tree.map(lambda a, j=j: a[j], layers) for j in range(g.count)]
            stats.append(None if s is None else _Stacked(s))
        moe_index = 0  # the MoE layer ordinal of layer i (router replay's layer axis)
        for i in range(0 if groups is not None else c.num_hidden_layers):
            forced = None
            if expert_ids is not None and c.is_moe_layer(i):
                forced, moe_index = expert_ids[:, :, moe_index], moe_index + 1
            if cache is None:
                # Segment ids, not just the mask: the MoE's sequence-wise balance loss is per document.
                x, s = block_cls(c, c.is_moe_layer(i), name=f"layers_{i}")(x, cos, sin, mask, segment_ids,
                                                                           None, None, True, forced)
            else:  # no remat: generation never differentiates; and never drops tokens
                x, s, layer = Block(dropless_config(c), c.is_moe_layer(i), name=f"layers_{i}")(
                    x, cos, sin, mask, valid_BxT, cache.layers[i], index, absorbed)
                layer_caches.append(layer)
            stats.append(s)
        h = RMSNorm(c.rms_norm_eps, name="final_norm")(x)
        if c.tie_word_embeddings:
            head = embed.attend
        else:  # float32 logits, accumulated in float32 whatever the activation dtype
            head = Dense((c.hidden_size,), (c.vocab_size,), ("embed", "vocab"), dt, jnp.float32, name="lm_head")
        head_kernel = None
        if return_hidden and cache is None:  # the loss applies the head (chunked_xent.py)
            p = nn.meta.unbox(self.variables["params"])
            head_kernel = p["embed"]["embedding"].T if c.tie_word_embeddings else p["lm_head"]["kernel"]
            head = lambda h_BxTxD: h_BxTxD
        logits = head(h)
        if cache is not None:
            out = ModelOutput(logits=logits, moe=_stack_stats(stats), hidden=h)
            return out, cache.replace(layers=tuple(layer_caches))

        mtp_logits = []
        h_prev, next_tokens = h, tokens_BxT
        for k in range(c.num_mtp_layers):
            # Depth k+1 at position i sees token t_{i+k+1} and predicts t_{i+k+2}; the embedding
            # and output head are shared with the main model. The chain of V3 eq. 21-22: depth k
            # builds on depth k-1's representation, the same kind at every depth: the final-normed
            # state its output head reads (the main model's h for depth 1, as the checkpoints run).
            next_tokens = shift_left(next_tokens)
            _, h_prev, s = MTPModule(c, name=f"mtp_{k}")(h_prev, embed(next_tokens), cos, sin, mask, segment_ids)
            stats.append(s)
            mtp_logits.append(head(h_prev))
        mtp = jnp.stack(mtp_logits) if mtp_logits else None
        return ModelOutput(
            logits=None if return_hidden else logits,
            mtp_logits=None if return_hidden else mtp,
            moe=_stack_stats(stats),
            hidden=h,
            mtp_hidden=mtp if return_hidden else None,
            head_kernel=head_kernel,
        )


def dropless_config(config: ModelConfig) -> ModelConfig:
    """`config` with capacity dispatch (and bounded expert-parallel buffers, which can drop
    too) replaced by exact dropless dispatch (same parameters).

    DeepSeek-V2 §2.2.4 drops tokens in training only. Inference (generation, evaluation,
    GRPO rollouts and their log-probs) runs dropless, so a row's output never depends on
    which other rows share its batch.
    """
    if config.moe_dispatch != "capacity" and config.ep_buffer_factor is None:
        return config
    return config.replace(moe_dispatch="dropless", ep_buffer_factor=None)


def inference_model(model: "Transformer") -> "Transformer":
    """`model` for evaluation and sampling: the same module with dropless dispatch."""
    config = dropless_config(model.config)
    return model if config is model.config else Transformer(config)


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1, length: int = 8):
    """Unboxed float32 parameters (logical axis metadata stripped)."""
    model = Transformer(config)
    tokens = jnp.zeros((batch, length), jnp.int32)
    return nn.meta.unbox(model.init(rng, tokens)["params"])
