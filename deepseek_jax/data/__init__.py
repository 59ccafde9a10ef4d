"""Data: tokenizers, sources, synthetic verifiable tasks, packing and pipelines on Grain.

The batch layout every trainer consumes is documented in `packing.py`; the pipeline
stages, determinism and resume contract in `pipeline.py`.
"""
from deepseek_jax.data.pipeline import DataPipeline, make_pretrain_dataset, make_sft_dataset
from deepseek_jax.data.sources import (
    ArrayRecordSource,
    JsonlSource,
    MixtureSource,
    ParquetSource,
    SyntheticSource,
    TextSource,
    make_source,
)
from deepseek_jax.data.stats import DataStats, PipelineStats, SourceStats
from deepseek_jax.data.synthetic import make_problem, make_problems, render_sft, render_text
from deepseek_jax.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = [
    "ArrayRecordSource", "ByteTokenizer", "DataPipeline", "DataStats", "HFTokenizer",
    "JsonlSource", "MixtureSource", "ParquetSource", "PipelineStats", "SourceStats",
    "SyntheticSource", "TextSource", "get_tokenizer", "make_pretrain_dataset",
    "make_problem", "make_problems", "make_sft_dataset", "make_source", "render_sft",
    "render_text",
]
