"""What a forward pass returns.

Dimension legend: B batch, T time, V vocabulary, N MTP depth, L MoE layers, E routed experts.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax


@flax.struct.dataclass
class MoEStats:
    """Per-layer routing statistics, summed over the tokens of each sequence (row).

    Sums, not means, so that micro-batches and data-parallel shards add up to the
    statistics of the global batch (REFERENCES.md pitfall 6).
    """

    counts: jax.Array  # [L, B, E] routed token-slots per expert (each token adds K in total)
    probs: jax.Array  # [L, B, E] sum over tokens of the router scores normalised over all E
    router_z: jax.Array  # [L, B] sum over tokens of logsumexp(router logits)^2
    tokens: jax.Array  # [B] tokens counted per row (non-padding)
    dropped: jax.Array  # [L] token-slots dropped by capacity-limited dispatch (0 when dropless)
    # [L, B, G] tokens sent to each expert group (= device under device-limited routing), a
    # token counting once per group however many of its experts are there (V2 eq. 18-20).
    group_tokens: Optional[jax.Array] = None
    # [L, B] V3's sequence-wise balance loss sum_i f_i P_i (eq. 17-20, no alpha) per DOCUMENT
    # (segment), averaged over the documents of each row: packed rows hold several sequences.
    seq_balance: Optional[jax.Array] = None
    # [L, B, T, K] int32 the experts each token was routed to (not a sum: a sampler records
    # them for router replay, grpo.router_replay; the training forward replays them).
    expert_ids: Optional[jax.Array] = None


@flax.struct.dataclass
class ModelOutput:
    logits: Optional[jax.Array]  # [B, T, V] float32 (None with return_hidden=True)
    mtp_logits: Optional[jax.Array] = None  # [N, B, T, V]; [k, :, t] predicts tokens[:, t + k + 2]
    moe: Optional[MoEStats] = None  # None for dense models
    hidden: Optional[jax.Array] = None  # [B, T, D] final hidden state after the final norm
    # With model.apply(..., return_hidden=True) the logits are left to the loss (chunked_xent):
    # logits and mtp_logits are None; the MTP depths' final-normed states and the head's kernel
    # (lm_head, or the tied embedding transposed) come instead.
    mtp_hidden: Optional[jax.Array] = None  # [N, B, T, D]
    head_kernel: Optional[jax.Array] = None  # [D, V] float32

    @property
    def expert_load(self) -> Optional[jax.Array]:
        """[L, E] fraction of routed token-slots that went to each expert, per MoE layer."""
        if self.moe is None:
            return None
        counts_LxE = self.moe.counts.sum(axis=1)
        return counts_LxE / counts_LxE.sum(axis=-1, keepdims=True).clip(min=1.0)
