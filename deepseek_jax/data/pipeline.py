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
from typing import Any, Union

import grain

from deepseek_jax.data import packing
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
    """Record -> packable example whose loss covers the response (and its eos) only."""

    def __init__(self, tokenizer, prompt_field, response_field, seq_len, overlong, stats):
        self.tokenizer = tokenizer
        self.prompt_field, self.response_field = prompt_field, response_field
        self.seq_len, self.overlong, self.stats = seq_len, overlong, stats

    def __call__(self, record) -> Any:
        prompt = self.tokenizer.encode(record[self.prompt_field], add_bos=True)
        response = self.tokenizer.encode(record[self.response_field], add_eos=True)
        weights = [0.0] * len(prompt) + [1.0] * len(response)
        return packing.make_example(
            prompt + response, weights, seq_len=self.seq_len, overlong=self.overlong,
            stats=self.stats,
        )


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
) -> DataPipeline:
    """Packed SFT batches: each document is [bos] + prompt + response + [eos], and
    loss_mask is 1 only where the target is a response token or that final eos.

    The prompt and response are joined as they are; put any separator the format
    needs in the prompt or the response. Arguments as in `make_pretrain_dataset`.
    """
    _check_args(seq_len, batch_size, seed, num_epochs, shard_index, shard_count, overlong)
    tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    stats = PipelineStats()
    to_example = _SFTExample(tokenizer, prompt_field, response_field, seq_len, overlong, stats)
    return _build(
        source, tokenizer, to_example, stats, seq_len=seq_len, batch_size=batch_size,
        seed=seed, num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
        num_packing_bins=num_packing_bins, drop_remainder=drop_remainder,
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size,
    )
