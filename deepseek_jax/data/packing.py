"""Documents -> fixed-length packed rows, by Grain's first-fit packing.

Batch layout. Every batch is a dict of `[B, T]` arrays:

    tokens       int32    input ids; pad_id in padding
    targets      int32    the next token of the same document; pad_id where there is none
    loss_mask    float32  1.0 where targets[b, t] counts in the loss, else 0.0
    segment_ids  int32    1, 2, 3, ... for the documents of a row; 0 = padding
    positions    int32    position inside its document, restarting at 0 for each one

The model is fed the full row `tokens` and scored against `targets`; nothing is
shifted at train time. Attention must stay causal *and* within a segment
(segment_ids[q] == segment_ids[k]), and RoPE uses `positions`.

How a document becomes a packable example: its ids (length L, e.g. [bos] + text +
[eos]) and per-id weights (1 for every id in pretraining; for SFT 1 on the response
and the final eos only) give

    tokens = ids[:-1]    targets = ids[1:]    loss_mask = weights[1:]

i.e. L-1 slots, each with a real target from the same document. A target therefore
never crosses a document boundary: the last slot of a document predicts its own eos,
and the next document starts afresh with its bos.

Overlong documents (L-1 > T): `overlong="truncate"` keeps the first T+1 ids (T slots,
all with real targets); "drop" skips the document. Documents with fewer than two ids,
and ones left with no loss weight after truncation (an SFT prompt that fills the row),
are dropped. All of these are counted in `PipelineStats`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import grain
import numpy as np

from deepseek_jax.data.stats import PipelineStats

OVERLONG = ("truncate", "drop")
PACKED_FEATURES = ("tokens", "targets", "loss_mask")


def make_example(
    ids: Sequence[int],
    weights: Sequence[float],
    *,
    seq_len: int,
    overlong: str,
    stats: PipelineStats,
) -> Optional[dict]:
    """One document's tokens/targets/loss_mask (see the module docstring), or None
    when it is dropped."""
    if len(ids) != len(weights):
        raise ValueError(f"ids and weights differ in length: {len(ids)} vs {len(weights)}")
    if len(ids) < 2:
        stats.add("dropped_too_short")
        return None
    if len(ids) - 1 > seq_len:
        if overlong == "drop":
            stats.add("dropped_overlong")
            return None
        stats.add("truncated")
        ids, weights = ids[: seq_len + 1], weights[: seq_len + 1]
    ids = np.asarray(ids, np.int32)
    loss_mask = np.asarray(weights[1:], np.float32)
    if not loss_mask.any():
        stats.add("dropped_no_loss")
        return None
    stats.add("documents")
    stats.add("tokens", len(ids) - 1)
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask}


def _to_layout(packed: dict) -> dict:
    """Grain names packing metadata per feature (tokens_segment_ids, ...); all three
    features share it, so keep one copy under the layout's names."""
    return {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "loss_mask": packed["loss_mask"],
        "segment_ids": packed["tokens_segment_ids"],
        "positions": packed["tokens_positions"],
    }


def pack_and_batch(
    examples: grain.IterDataset,
    *,
    seq_len: int,
    batch_size: int,
    pad_id: int,
    seed: int,
    num_packing_bins: Optional[int] = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """First-fit packs `make_example` dicts into rows of length seq_len, then batches.

    Grain's packer fills `num_packing_bins` rows (default: batch_size) and emits them
    all when an example fits in none, so more bins means less padding but more
    reordering. Its state is part of the iterator state: resuming is exact.
    """
    num_packing_bins = num_packing_bins or batch_size
    lengths = {k: seq_len for k in PACKED_FEATURES}
    packed = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct=lengths,
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=True,
        padding_struct={"tokens": pad_id, "targets": pad_id, "loss_mask": 0},
    )
    return packed.map(_to_layout).batch(batch_size, drop_remainder=drop_remainder)
