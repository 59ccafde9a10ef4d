"""Pipeline builders: source -> shuffled, sharded, tokenised, packed `[B, T]` batches.

    pipe = make_pretrain_dataset(SyntheticSource(), "byte", seq_len=128, batch_size=8)
    it = iter(pipe.dataset)                  # a grain DatasetIterator
    batch = next(it)                         # layout: packing.py's module docstring
    state = it.get_state()                   # small dict; checkpoint it with the model
    it = iter(pipe.dataset); it.set_state(state)   # resumes at the exact next element
    metrics.update(pipe.stats.as_dict())

Stages, in order, and why in that order:
  1. `MapDataset.source(source).shuffle(seed).repeat(num_epochs)`: one global
     permutation of the whole source per epoch (Grain seeds epoch e with seed + e),
     identical on every host because it depends only on the seed.
  2. `[shard_index::shard_count]`: each host takes every shard_count-th element of
     that global order, and reads only those records.
  3. `map(tokenise)`: ids + loss weights -> one packable example (None drops it).
  4. `to_iter_dataset`: a few threads read and tokenise ahead of the consumer.
  5. First-fit packing and batching (packing.py).

Determinism. For a fixed source, seed and shard_count, host k's i-th batch is a
function of (seed, i) alone, not of threads, timing or restarts; the global batch of
step i is the hosts' i-th batches concatenated in shard order. `batch_size` is the
per-host batch. Because packing runs per host, changing shard_count changes how
documents are packed (each epoch still visits every document exactly once).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import grain
import numpy as np

from deepseek_jax.data import chat, packing
from deepseek_jax.data.sources import source_stats
from deepseek_jax.data.stats import DataStats, PipelineStats
from deepseek_jax.data.tokenizer import get_tokenizer


@dataclasses.dataclass(frozen=True)
class DataPipeline:
    """A built pipeline: the Grain dataset to iterate, and its data-quality counters."""

    dataset: grain.IterDataset
    stats: DataStats
    tokenizer: Any


class _PretrainExample:
    """Record -> packable example, with every next-token target counted."""

    def __init__(self, tokenizer, field, add_bos, add_eos, seq_len, overlong, stats):
        self.tokenizer, self.field = tokenizer, field
        self.add_bos, self.add_eos = add_bos, add_eos
        self.seq_len, self.overlong, self.stats = seq_len, overlong, stats

    def __call__(self, record) -> Any:
        text = record if isinstance(record, str) else record[self.field]
        ids = self.tokenizer.encode(text, add_bos=self.add_bos, add_eos=self.add_eos)
        return packing.make_example(
            ids, [1.0] * len(ids), seq_len=self.seq_len, overlong=self.overlong, stats=self.stats
        )


class _SFTExample:
    """Record -> packable example whose loss covers the response (and its eos) only.

    A record is {prompt, response} (strings, or TRL-style message lists) or {"messages"};
    with a chat template (data/chat.py) the conversation is rendered by it and the loss
    covers the assistant turns as the template writes them.
    """

    def __init__(self, tokenizer, prompt_field, response_field, seq_len, overlong, stats, template=None):
        self.tokenizer, self.template = tokenizer, template
        self.prompt_field, self.response_field = prompt_field, response_field
        self.seq_len, self.overlong, self.stats = seq_len, overlong, stats

    def ids_and_weights(self, record) -> tuple[list[int], list[float]]:
        if self.template is None and "messages" not in record:
            prompt_text, response_text = record[self.prompt_field], record[self.response_field]
            if isinstance(prompt_text, str) and isinstance(response_text, str):
                prompt = self.tokenizer.encode(prompt_text, add_bos=True)
                response = self.tokenizer.encode(response_text, add_eos=True)
                return prompt + response, [0.0] * len(prompt) + [1.0] * len(response)
        if "messages" in record:
            messages = record["messages"]
        else:
            messages = (chat.as_messages(record[self.prompt_field], "user")
                        + chat.as_messages(record[self.response_field], "assistant"))
        return chat.tokenize_conversation(self.tokenizer, self.template, messages)

    def __call__(self, record) -> Any:
        ids, weights = self.ids_and_weights(record)
        return packing.make_example(ids, weights, seq_len=self.seq_len, overlong=self.overlong,
                                    stats=self.stats)


def check_rows(source, to_example) -> None:
    """Tokenise every row once before training, so that a row the chat template refuses
    is an error naming its file:line at start-up, not a crash mid-run (nor a skipped row
    that would shift the data order). Sources without `where` (synthetic) are trusted."""
    where = getattr(source, "where", None)
    if where is None:
        return
    for i in range(len(source)):
        try:
            to_example.ids_and_weights(source[i])
        except (chat.TemplateMismatch, KeyError, TypeError) as e:
            raise ValueError(f"{where(i)}: {e}") from None


def _check_args(seq_len, batch_size, seed, num_epochs, shard_index, shard_count, overlong):
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) for Grain's shuffle, got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count, got {shard_index} of {shard_count}; "
            "use jax.process_index() and jax.process_count()"
        )
    if overlong not in packing.OVERLONG:
        raise ValueError(f"overlong must be one of {packing.OVERLONG}, got {overlong!r}")


def _build(source, tokenizer, to_example, stats, *, seq_len, batch_size, seed, num_epochs,
           shard_index, shard_count, num_packing_bins, drop_remainder, num_threads,
           prefetch_buffer_size) -> DataPipeline:
    if len(source) == 0:
        raise ValueError(f"data source {source!r} is empty")
    records = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    examples = records[shard_index::shard_count].map(to_example)
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
    )
    batches = packing.pack_and_batch(
        examples.to_iter_dataset(read_options),
        seq_len=seq_len, batch_size=batch_size, pad_id=tokenizer.pad_id, seed=seed,
        num_packing_bins=num_packing_bins, drop_remainder=drop_remainder,
    )
    return DataPipeline(batches, DataStats(source_stats(source), stats), tokenizer)


def make_pretrain_dataset(
    source,
    tokenizer: Union[str, Any] = "byte",
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    overlong: str = "truncate",
    text_field: str = "text",
    add_bos: bool = True,
    add_eos: bool = True,
    num_packing_bins: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
) -> DataPipeline:
    """Packed next-token batches of `source`'s `text_field` documents.

    Args:
      source: a random-access source (sources.py), or a plain sequence of records
        (dicts, or bare strings).
      tokenizer: a tokenizer object or a name for `get_tokenizer` ("byte", a path).
      seq_len, batch_size: T and the per-host B of every batch.
      seed: drives the document order of every epoch and the packing.
      num_epochs: passes over the source; None repeats forever.
      shard_index, shard_count: this host's share (jax.process_index/count()).
      overlong: "truncate" or "drop" documents longer than seq_len + 1 ids.
      num_packing_bins: rows first-fit packs at once (default batch_size).
      drop_remainder: drop a last, smaller batch (finite num_epochs only).
      num_threads, prefetch_buffer_size: Grain read-ahead in this process.
    """
    _check_args(seq_len, batch_size, seed, num_epochs, shard_index, shard_count, overlong)
    tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    stats = PipelineStats()
    to_example = _PretrainExample(tokenizer, text_field, add_bos, add_eos, seq_len, overlong, stats)
    return _build(
        source, tokenizer, to_example, stats, seq_len=seq_len, batch_size=batch_size,
        seed=seed, num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
        num_packing_bins=num_packing_bins, drop_remainder=drop_remainder,
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size,
    )


def make_sft_dataset(
    source,
    tokenizer: Union[str, Any] = "byte",
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    overlong: str = "truncate",
    prompt_field: str = "prompt",
    response_field: str = "response",
    num_packing_bins: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
    chat_template: Optional[chat.ChatTemplate] = None,
) -> DataPipeline:
    """Packed SFT batches: each document is [bos] + prompt + response + [eos], and
    loss_mask is 1 only where the target is a response token or that final eos.

    The prompt and response are joined as they are; put any separator the format
    needs in the prompt or the response. Records may instead hold "messages" (a
    conversation); `chat_template` (chat.load_template) renders conversations and
    prompt/response pairs with the checkpoint's template (loss on assistant turns).
    Rows of file sources are all tokenised once up front (`check_rows`). Other
    arguments as in `make_pretrain_dataset`.
    """
    _check_args(seq_len, batch_size, seed, num_epochs, shard_index, shard_count, overlong)
    tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    stats = PipelineStats()
    to_example = _SFTExample(tokenizer, prompt_field, response_field, seq_len, overlong, stats, chat_template)
    check_rows(source, to_example)
    return _build(
        source, tokenizer, to_example, stats, seq_len=seq_len, batch_size=batch_size,
        seed=seed, num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
        num_packing_bins=num_packing_bins, drop_remainder=drop_remainder,
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size,
    )


# ----- DPO: (chosen, rejected) row pairs ---------------------------------------------------------

class _PairExample:
    """{prompt, chosen, rejected} -> [2, T] arrays, row 0 chosen and row 1 rejected, each
    one sequence (not packed: the loss sums each response's log-probs) with loss on the
    response tokens. Strings or message lists (TRL's conversational preference rows)."""

    def __init__(self, tokenizer, seq_len, stats, template=None):
        self.tokenizer, self.seq_len, self.stats = tokenizer, seq_len, stats
        self._sft = _SFTExample(tokenizer, "prompt", "response", seq_len, "truncate", stats, template)

    def ids_and_weights(self, record) -> list[tuple[list[int], list[float]]]:
        return [self._sft.ids_and_weights({"prompt": record["prompt"], "response": record[side]})
                for side in ("chosen", "rejected")]

    def __call__(self, record) -> Optional[dict]:
        T = self.seq_len
        rows = {k: np.zeros((2, T), dtype) for k, dtype in (
            ("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
            ("segment_ids", np.int32), ("positions", np.int32))}
        rows["tokens"][:] = rows["targets"][:] = self.tokenizer.pad_id
        for r, (ids, weights) in enumerate(self.ids_and_weights(record)):
            if len(ids) - 1 > T:
                self.stats.add("truncated")
                ids, weights = ids[:T + 1], weights[:T + 1]
            n = len(ids) - 1
            if n < 1 or not any(weights[1:]):
                self.stats.add("dropped_no_loss")  # the prompt fills the row: nothing to compare
                return None
            rows["tokens"][r, :n], rows["targets"][r, :n] = ids[:-1], ids[1:]
            rows["loss_mask"][r, :n] = weights[1:]
            rows["segment_ids"][r, :n], rows["positions"][r, :n] = 1, np.arange(n)
        self.stats.add("documents", 2)
        self.stats.add("tokens", int((rows["segment_ids"] > 0).sum()))
        return rows


def _stack_pairs(batch: dict) -> dict:
    """[P, 2, T] -> [2P, T]: rows (0, 1), (2, 3), ... are (chosen, rejected) pairs (losses.dpo_loss)."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def make_dpo_dataset(
    source,
    tokenizer: Union[str, Any] = "byte",
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    chat_template: Optional[chat.ChatTemplate] = None,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
) -> DataPipeline:
    """Batches of `batch_size` rows = batch_size / 2 preference pairs, in the layout of
    packing.py (one sequence per row), rows 2i / 2i + 1 the chosen / rejected response to
    the same prompt. Pairs whose prompt leaves no response token in seq_len are dropped
    (counted); longer ones are truncated (counted)."""
    _check_args(seq_len, batch_size, seed, num_epochs, shard_index, shard_count, "truncate")
    if batch_size % 2:
        raise ValueError(f"data.batch_size={batch_size}: DPO rows come in (chosen, rejected) pairs; use an even number")
    tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if len(source) == 0:
        raise ValueError(f"data source {source!r} is empty")
    stats = PipelineStats()
    to_example = _PairExample(tokenizer, seq_len, stats, chat_template)
    check_rows(source, to_example)
    records = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    examples = records[shard_index::shard_count].map(to_example).filter(lambda x: x is not None)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    batches = (examples.to_iter_dataset(read_options)
               .batch(batch_size // 2, drop_remainder=drop_remainder).map(_stack_pairs))
    return DataPipeline(batches, DataStats(source_stats(source), stats), tokenizer)
