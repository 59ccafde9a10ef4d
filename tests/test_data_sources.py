"""Data sources: every format read back exactly, and bad rows counted or reported
with their location. The oracle is the list of rows the test itself wrote."""
import json
import pickle

import pytest

from deepseek_jax.data.sources import (
    ArrayRecordSource,
    JsonlSource,
    MixtureSource,
    ParquetSource,
    SyntheticSource,
    TextSource,
    make_source,
)
from deepseek_jax.data.stats import DataStats, PipelineStats
from deepseek_jax.data.synthetic import make_problem, render_sft, shows_reasoning

# Line by line: what a messy JSONL file holds, and what each line should count as.
_MESSY_JSONL = [
    (b'{"text": "first"}', "kept"),
    (b"", "empty"),
    (b'{"text": "   "}', "empty"),
    (b'{"text": "broken', "malformed"),
    (b'{"text": "caf\xe9 au lait"}', "non_utf8"),  # latin-1 byte inside a JSON string
    (b"[1, 2]", "malformed"),
    (b'{"body": "wrong field"}', "malformed"),
    (b'{"text": 7}', "malformed"),
    (b'{"text": null}', "empty"),
    (b'{"text": "last", "extra": 1}', "kept"),
]


def _write_messy_jsonl(path):
    path.write_bytes(b"\n".join(line for line, _ in _MESSY_JSONL) + b"\n")
    return path


def _records(source):
    return [source[i] for i in range(len(source))]


def test_jsonl_skips_and_counts_bad_rows(tmp_path):
    src = JsonlSource(_write_messy_jsonl(tmp_path / "messy.jsonl"))
    kinds = [kind for _, kind in _MESSY_JSONL]
    assert _records(src) == [{"text": "first"}, {"text": "caf\ufffd au lait"}, {"text": "last"}]
    st = src.stats
    assert st.rows_read == len(_MESSY_JSONL)
    assert st.rows_kept == kinds.count("kept") + kinds.count("non_utf8") == 3
    assert st.empty_skipped == kinds.count("empty") == 3
    assert st.malformed_skipped == kinds.count("malformed") == 4
    assert st.non_utf8_rows == 1
    # Each skipped malformed row is reported with file:line (1-based).
    malformed_lines = [i + 1 for i, (_, k) in enumerate(_MESSY_JSONL) if k == "malformed"]
    for line in malformed_lines:
        assert any(e.startswith(f"{tmp_path / 'messy.jsonl'}:{line}: ") for e in st.examples)


def test_jsonl_source_survives_pickling(tmp_path):
    # Grain's worker processes receive sources pickled; open files must not travel.
    src = JsonlSource(_write_messy_jsonl(tmp_path / "messy.jsonl"))
    assert src[0] == {"text": "first"}  # opens the file in this process
    clone = pickle.loads(pickle.dumps(src))
    assert _records(clone) == _records(src) and clone.stats == src.stats


def test_jsonl_raise_names_file_and_line(tmp_path):
    path = _write_messy_jsonl(tmp_path / "messy.jsonl")
    first_bad = 1 + [k for _, k in _MESSY_JSONL].index("malformed")
    with pytest.raises(ValueError, match=rf"messy\.jsonl:{first_bad}: invalid JSON"):
        JsonlSource(path, on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        JsonlSource(path, on_error="ignore")


def test_jsonl_prompt_response_fields_and_renaming(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = JsonlSource(str(tmp_path / "*.jsonl"), fields={"prompt": "q", "response": "a"})
    assert _records(src) == [{"prompt": r["q"], "response": r["a"]} for r in rows]


def test_text_source_lines_and_whole_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\n\n   \r\nt\xffwo\r\nthree")
    (tmp_path / "b.txt").write_bytes(b"")
    lines = TextSource([tmp_path / "a.txt"], mode="line")
    assert _records(lines) == [{"text": "one"}, {"text": "t\ufffdwo"}, {"text": "three"}]
    st = lines.stats
    assert (st.rows_read, st.empty_skipped, st.non_utf8_rows) == (5, 2, 1)
    files = TextSource(str(tmp_path / "*.txt"), mode="file")
    assert _records(files) == [{"text": "one\n\n   \r\nt\ufffdwo\r\nthree"}]
    assert files.stats.empty_skipped == 1  # the empty b.txt


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        JsonlSource(str(tmp_path / "nothing*.jsonl"))


def test_arrayrecord_text_and_json(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    texts = [b"alpha", b"", b"g\xffamma", b"delta"]
    writer = ArrayRecordWriter(str(tmp_path / "t.array_record"), "group_size:1")
    for t in texts:
        writer.write(t)
    writer.close()
    src = ArrayRecordSource(tmp_path / "t.array_record", record_format="text")
    assert _records(src) == [{"text": "alpha"}, {"text": "g\ufffdamma"}, {"text": "delta"}]
    assert (src.stats.empty_skipped, src.stats.non_utf8_rows) == (1, 1)

    rows = [b'{"text": "one"}', b"not json", b'{"text": "two"}']
    writer = ArrayRecordWriter(str(tmp_path / "j.array_record"), "group_size:1")
    for r in rows:
        writer.write(r)
    writer.close()
    src = ArrayRecordSource(tmp_path / "j.array_record", record_format="json")
    assert _records(src) == [{"text": "one"}, {"text": "two"}]
    assert src.stats.malformed_skipped == 1
    with pytest.raises(ValueError, match=r"j\.array_record:record 1"):
        ArrayRecordSource(tmp_path / "j.array_record", record_format="json", on_error="raise")


def test_parquet_columns_nulls_and_binary(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({
        "content": ["first", None, "", "fourth"],
        "raw": [b"x", b"y", b"z", b"\xffw"],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    src = ParquetSource(tmp_path / "d.parquet", fields={"text": "content"})
    assert _records(src) == [{"text": "first"}, {"text": "fourth"}]
    assert (src.stats.rows_read, src.stats.empty_skipped) == (4, 2)
    binary = ParquetSource(tmp_path / "d.parquet", fields={"text": "raw"})
    assert _records(binary)[-1] == {"text": "\ufffdw"} and binary.stats.non_utf8_rows == 1
    with pytest.raises(ValueError, match="no column"):
        ParquetSource(tmp_path / "d.parquet", fields=("text",))


def test_synthetic_source_matches_generator():
    src = SyntheticSource(20, split="heldout", seed=4, task="countdown", style="sft")
    assert len(src) == 20
    expected = [render_sft(make_problem(i, split="heldout", seed=4, task="countdown"))
                for i in range(20)]
    assert _records(src) == expected
    with pytest.raises(IndexError):
        src[20]


def test_synthetic_source_answer_only_fraction():
    """The same problems as without the option; records whose think block is empty are
    exactly those `shows_reasoning` names, about the requested share of them."""
    src = SyntheticSource(400, seed=2, task="arithmetic", style="sft", answer_only_fraction=0.75)
    bare = [r["response"].startswith("<think></think>") for r in _records(src)]
    expected = [not shows_reasoning(i, split="train", seed=2, answer_only_fraction=0.75)
                for i in range(400)]
    assert bare == expected and 0.65 < sum(bare) / 400 < 0.85
    for i in range(20):
        assert src[i] == render_sft(make_problem(i, seed=2, task="arithmetic"), not bare[i])
    with pytest.raises(ValueError, match="answer_only_fraction"):
        SyntheticSource(10, answer_only_fraction=-0.1)


def test_mixture_follows_weights_and_repeats_small_sources():
    big = [{"text": f"big {i}"} for i in range(300)]
    small = [{"text": f"small {i}"} for i in range(10)]
    mix = MixtureSource([big, small], weights=[3, 1], seed=1, length=400)
    drawn = _records(mix)
    n_small = sum(r["text"].startswith("small") for r in drawn)
    assert len(drawn) == 400 and abs(n_small - 100) <= 2  # 1/4 of the draws
    # The 10-row source recurs instead of ending the mixture, each row about equally.
    assert {r["text"] for r in drawn if r["text"].startswith("small")} == {r["text"] for r in small}
    assert len({r["text"] for r in drawn if r["text"].startswith("big")}) == 300


def test_make_source_from_plain_spec_and_stats_dict(tmp_path):
    path = _write_messy_jsonl(tmp_path / "m.jsonl")
    spec = {"kind": "mixture", "weights": [1, 1], "components": [
        {"kind": "jsonl", "paths": str(path)},
        {"kind": "synthetic", "n": 8, "task": "arithmetic"},
    ]}
    src = make_source(spec)
    stats = DataStats(src.source_stats, PipelineStats()).as_dict()
    assert stats["data/malformed_skipped"] == 4 and stats["data/rows_kept"] == 3 + 8
    with pytest.raises(ValueError, match="unknown source kind"):
        make_source({"kind": "csv"})
