"""Grain random-access data sources: JSONL, text, ArrayRecord, Parquet, synthetic, mixtures.

Every source is a `grain.sources.RandomAccessDataSource` (`__len__`, `__getitem__`)
whose elements are dicts of strings: `{"text": ...}` for pretraining, or
`{"prompt": ..., "response": ...}` for SFT (field names chosen by `fields`). Random
access is what lets the pipeline shuffle globally and give each host only its own
indices, so sources index their files when built instead of streaming them.

Indexing also validates every row, once, so bad data is found before training starts
and the counts (`source_stats`, see stats.py) are exact and the same on every host:

* empty rows (blank lines, empty or whitespace-only fields, nulls) are skipped and counted;
* undecodable UTF-8 is replaced with U+FFFD, kept and counted;
* malformed rows (bad JSON, not an object, a missing or non-string field) raise a
  ValueError naming `path:line` when `on_error="raise"`, or are skipped and counted
  (with their locations in `SourceStats.examples`) when `on_error="skip"`.

The price is one pass over the data at start-up, and an index of ~20 bytes per row.
`fields` is a sequence of names, or a mapping {output name: name in the file} to
read, say, a "content" column as "text". `message_fields` names the fields that may
also hold a conversation, a list of {"role", "content"} objects (SFT `messages`, DPO
`prompt`/`chosen`/`rejected` in TRL's conversational form). `where(i)` is the
`path:line` (or `path:row`) of kept row i, for errors found after indexing.

Post-training files (`read_rows`, `detect_fields`): GRPO prompt files keep every column
of a row (a reward gets them as keywords), and an SFT/DPO file's row format is read
from its first row, so a row missing a column is an error naming its line.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import grain
import numpy as np

from deepseek_jax.data import chat, synthetic
from deepseek_jax.data.stats import ErrorPolicy, SourceStats

Paths = Union[str, Sequence[str]]
Fields = Union[Sequence[str], Mapping[str, str]]
_MISSING = object()


def expand_paths(paths: Paths) -> list[str]:
    """Paths and glob patterns -> a sorted, de-duplicated file list (sorted so every
    host builds the same index)."""
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[str] = []
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not os.path.isfile(m)]
        if not matches or missing:
            raise FileNotFoundError(f"no data file matches {pattern!r}")
        found.extend(matches)
    return list(dict.fromkeys(found))


def _field_map(fields: Fields) -> dict[str, str]:
    mapping = dict(fields) if isinstance(fields, Mapping) else {f: f for f in fields}
    if not mapping:
        raise ValueError("fields must name at least one field, e.g. ('text',)")
    return mapping


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text with undecodable bytes as U+FFFD, and whether there were any."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _validated(
    raw: Mapping[str, Any], where: str, policy: ErrorPolicy, bad_utf8: bool = False,
    message_fields: Sequence[str] = (),
) -> Optional[dict]:
    """Decoded row, or None when it is skipped (and counted). `raw` maps each output
    field to what the file held: str, bytes, None, _MISSING or something else;
    `bad_utf8` says the row's bytes were already found undecodable upstream; fields in
    `message_fields` may hold a conversation instead of a string."""
    stats = policy.stats
    decoded = {}
    for name, value in raw.items():
        if value is _MISSING:
            policy.malformed(where, f"missing field {name!r}")
            return None
        if name in message_fields and isinstance(value, (list, tuple)):
            problem = chat.check_messages(list(value))
            if problem:
                policy.malformed(where, f"field {name!r}: {problem}")
                return None
            decoded[name] = list(value)
            continue
        if isinstance(value, bytes):
            value, bad = _decode(value)
            bad_utf8 = bad_utf8 or bad
        elif value is not None and not isinstance(value, str):
            policy.malformed(where, f"field {name!r} is {type(value).__name__}, expected a string")
            return None
        decoded[name] = value
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in decoded.values()):
        stats.empty_skipped += 1
        return None
    if bad_utf8:
        stats.non_utf8_rows += 1
        stats.note(where, "invalid UTF-8, replaced with U+FFFD")
    stats.rows_kept += 1
    return decoded


def _parse_json_row(text: str, where: str, fields: dict, policy: ErrorPolicy) -> Optional[dict]:
    """A JSON object's raw field values for `_validated`, or None if malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # Some messages end in "at" ("Unterminated string starting at"): no "at at column".
        policy.malformed(where, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
        return None
    if not isinstance(obj, dict):
        policy.malformed(where, f"expected a JSON object, got {type(obj).__name__}")
        return None
    return {out: obj.get(key, _MISSING) for out, key in fields.items()}


def _index_json_row(line: bytes, where: str, fields: dict, policy: ErrorPolicy,
                    message_fields: Sequence[str] = ()) -> bool:
    """Validate one JSON row (counting it); True if it is kept."""
    text, bad_utf8 = _decode(line)
    raw = _parse_json_row(text, where, fields, policy)
    return raw is not None and _validated(raw, where, policy, bad_utf8, message_fields) is not None


class _FileSlices:
    """Byte ranges of kept rows, read back with os.pread (thread-safe, no seek state)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.file, self.start, self.length = [], [], []
        self._fds: dict[int, int] = {}

    def add(self, file: int, start: int, length: int) -> None:
        self.file.append(file)
        self.start.append(start)
        self.length.append(length)

    def freeze(self) -> None:
        # Arrays take ~20 bytes a row; Python lists of ints would take ~100.
        self.file = np.asarray(self.file, np.int32)
        self.start = np.asarray(self.start, np.int64)
        self.length = np.asarray(self.length, np.int64)

    def __len__(self) -> int:
        return len(self.file)

    def read(self, i: int) -> bytes:
        f = int(self.file[i])
        fd = self._fds.get(f)
        if fd is None:
            fd = os.open(self.paths[f], os.O_RDONLY)
            # Two reader threads may race to open the same file: keep one descriptor.
            kept = self._fds.setdefault(f, fd)
            if kept != fd:
                os.close(fd)
                fd = kept
        return os.pread(fd, int(self.length[i]), int(self.start[i]))

    def __getstate__(self):
        # File descriptors do not survive pickling (Grain worker processes).
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class _IndexedSource(grain.sources.RandomAccessDataSource):
    """Common surface: length, stats, repr. Subclasses set `stats`, `_index` (one
    entry per kept row) and `__getitem__`."""

    stats: SourceStats

    @property
    def source_stats(self) -> list[SourceStats]:
        return [self.stats]

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stats.name!r}, rows={len(self)})"

    def _check_nonempty(self) -> None:
        if len(self) == 0:
            raise ValueError(f"{self!r} has no usable rows; stats: {self.stats}")


class JsonlSource(_IndexedSource):
    """One JSON object per line; `fields` picks the strings to keep."""

    def __init__(self, paths: Paths, fields: Fields = ("text",), on_error: str = "skip",
                 message_fields: Sequence[str] = ()):
        self._paths = expand_paths(paths)
        self._fields = _field_map(fields)
        self.stats = SourceStats(name=f"jsonl:{','.join(self._paths)}")
        policy = ErrorPolicy(on_error, self.stats)
        self._index = _FileSlices(self._paths)
        lines = []
        for f, path in enumerate(self._paths):
            with open(path, "rb") as fh:
                offset = 0
                for lineno, line in enumerate(fh, start=1):
                    start, offset = offset, offset + len(line)
                    self.stats.rows_read += 1
                    if not line.strip():
                        self.stats.empty_skipped += 1
                        continue
                    where = f"{path}:{lineno}"
                    if _index_json_row(line, where, self._fields, policy, message_fields):
                        self._index.add(f, start, len(line))
                        lines.append(lineno)
        self._index.freeze()
        self._lines = np.asarray(lines, np.int64)
        self._check_nonempty()

    def __getitem__(self, i: int) -> dict:
        obj = json.loads(self._index.read(i).decode("utf-8", errors="replace"))
        return {out: obj[key] for out, key in self._fields.items()}

    def where(self, i: int) -> str:
        return f"{self._paths[int(self._index.file[i])]}:{int(self._lines[i])}"


class TextSource(_IndexedSource):
    """Plain text files: one document per line (`mode="line"`) or per file ("file")."""

    def __init__(self, paths: Paths, mode: str = "line"):
        if mode not in ("line", "file"):
            raise ValueError(f"mode must be 'line' or 'file', got {mode!r}")
        self._paths = expand_paths(paths)
        self.stats = SourceStats(name=f"text:{','.join(self._paths)}")
        policy = ErrorPolicy("skip", self.stats)  # plain text has no malformed rows
        self._index = _FileSlices(self._paths)
        for f, path in enumerate(self._paths):
            with open(path, "rb") as fh:
                if mode == "file":
                    self._index_row(fh.read(), f, 0, path, policy)
                    continue
                offset = 0
                for lineno, line in enumerate(fh, start=1):
                    self._index_row(line, f, offset, f"{path}:{lineno}", policy)
                    offset += len(line)
        self._index.freeze()
        self._check_nonempty()

    def _index_row(self, row: bytes, f: int, start: int, where: str, policy) -> None:
        self.stats.rows_read += 1
        body = row.rstrip(b"\r\n") if row.endswith(b"\n") else row
        if _validated({"text": body}, where, policy) is not None:
            self._index.add(f, start, len(body))

    def __getitem__(self, i: int) -> dict:
        return {"text": _decode(self._index.read(i))[0]}


class ArrayRecordSource(_IndexedSource):
    """ArrayRecord files (through Grain's ArrayRecordDataSource) whose records are
    UTF-8 text (`record_format="text"`, one document each) or JSON objects ("json")."""

    _SCAN_CHUNK = 1024  # records fetched per read while indexing

    def __init__(
        self,
        paths: Paths,
        record_format: str = "text",
        fields: Fields = ("text",),
        on_error: str = "skip",
    ):
        if record_format not in ("text", "json"):
            raise ValueError(f"record_format must be 'text' or 'json', got {record_format!r}")
        self._paths = expand_paths(paths)
        self._format = record_format
        self._fields = _field_map(fields) if record_format == "json" else {"text": "text"}
        self.stats = SourceStats(name=f"arrayrecord:{','.join(self._paths)}")
        policy = ErrorPolicy(on_error, self.stats)
        # One reader per file, so that a bad record can be reported as path:record.
        self._readers = [grain.sources.ArrayRecordDataSource([p]) for p in self._paths]
        kept = []
        for f, (path, reader) in enumerate(zip(self._paths, self._readers)):
            for lo in range(0, len(reader), self._SCAN_CHUNK):
                keys = list(range(lo, min(lo + self._SCAN_CHUNK, len(reader))))
                for key, record in zip(keys, reader.__getitems__(keys)):
                    self.stats.rows_read += 1
                    where = f"{path}:record {key}"
                    if record_format == "json":
                        ok = _index_json_row(record, where, self._fields, policy)
                    else:
                        ok = _validated({"text": record}, where, policy) is not None
                    if ok:
                        kept.append((f, key))
        self._index = np.asarray(kept, np.int64).reshape(-1, 2)
        self._check_nonempty()

    def __getitem__(self, i: int) -> dict:
        f, key = self._index[i]
        text = _decode(self._readers[f][int(key)])[0]
        if self._format == "text":
            return {"text": text}
        obj = json.loads(text)
        return {out: obj[k] for out, k in self._fields.items()}


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            "Parquet sources need the 'pyarrow' package: pip install pyarrow"
        ) from e
    return pq


class ParquetSource(_IndexedSource):
    """Parquet files read with pyarrow (memory-mapped); `fields` names string or
    binary columns.

    Not Grain's ParquetIterDataset: that one streams row groups in order, and global
    shuffling and per-host sharding by index need random access.
    """

    def __init__(self, paths: Paths, fields: Fields = ("text",), on_error: str = "skip",
                 message_fields: Sequence[str] = ()):
        pq = _import_pyarrow()
        self._paths = expand_paths(paths)
        self._fields = _field_map(fields)
        self.stats = SourceStats(name=f"parquet:{','.join(self._paths)}")
        policy = ErrorPolicy(on_error, self.stats)
        self._tables, kept = [], []
        for f, path in enumerate(self._paths):
            schema_names = pq.read_schema(path).names
            missing = [c for c in self._fields.values() if c not in schema_names]
            if missing:
                # A missing column breaks every row of the file: not a row-level error.
                raise ValueError(f"{path}: no column(s) {missing}; the file has {schema_names}")
            table = pq.read_table(path, columns=list(self._fields.values()), memory_map=True)
            self._tables.append(table)
            columns = {out: table.column(col).to_pylist() for out, col in self._fields.items()}
            for row in range(table.num_rows):
                self.stats.rows_read += 1
                raw = {out: values[row] for out, values in columns.items()}
                if _validated(raw, f"{path}:row {row}", policy, message_fields=message_fields) is not None:
                    kept.append((f, row))
        self._index = np.asarray(kept, np.int64).reshape(-1, 2)
        self._check_nonempty()

    def __getitem__(self, i: int) -> dict:
        f, row = (int(x) for x in self._index[i])
        table = self._tables[f]
        record = {}
        for out, col in self._fields.items():
            value = table.column(col)[row].as_py()
            record[out] = _decode(value)[0] if isinstance(value, bytes) else value
        return record

    def where(self, i: int) -> str:
        f, row = (int(x) for x in self._index[i])
        return f"{self._paths[f]}:row {row}"


class SyntheticSource(_IndexedSource):
    """The embedded corpus: problem i of `synthetic.make_problem`, rendered as a
    pretraining text (`style="text"`) or an SFT pair ("sft"), generated on access.
    About `answer_only_fraction` of the records leave the worked solution out."""

    def __init__(
        self,
        n: int = 100_000,
        split: str = "train",
        seed: int = 0,
        task: str = "mixed",
        style: str = "text",
        answer_only_fraction: float = 0.0,
        **options,
    ):
        # Render one problem now so that a bad option fails here, not inside Grain.
        first = synthetic.make_problem(0, split=split, seed=seed, task=task, **options)
        synthetic.render(first, style)
        self._n, self._style = int(n), style
        self._reasoning = functools.partial(synthetic.shows_reasoning, split=split, seed=seed,
                                            answer_only_fraction=answer_only_fraction)
        self._reasoning(0)  # a bad fraction fails here too
        self._kwargs = dict(split=split, seed=seed, task=task, **options)
        self.stats = SourceStats(
            name=f"synthetic:{task}:{split}:seed={seed}", rows_read=self._n, rows_kept=self._n
        )
        self._index = range(self._n)
        self._check_nonempty()

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for {self!r}")
        problem = synthetic.make_problem(int(i), **self._kwargs)
        return synthetic.render(problem, self._style, self._reasoning(int(i)))


class MixtureSource(grain.sources.RandomAccessDataSource):
    """A weighted mixture of sources, by Grain's `MapDataset.mix`.

    Component i is shuffled with its own seed and repeated as often as needed, so a
    small source recurs instead of cutting the mixture short (Grain's mix stops at
    the first exhausted component); the mixture then has `length` elements (default:
    the components' total) drawn in the proportions `weights`.
    """

    def __init__(
        self,
        sources: Sequence[grain.sources.RandomAccessDataSource],
        weights: Optional[Sequence[float]] = None,
        seed: int = 0,
        length: Optional[int] = None,
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources) or min(weights) <= 0:
            raise ValueError(
                f"weights must be {len(sources)} positive numbers, one per source; got {weights}"
            )
        self._sources = list(sources)
        self._length = int(length) if length is not None else sum(len(s) for s in sources)
        components = [
            grain.MapDataset.source(s)
            .shuffle(seed=(seed * 1_000_003 + i) % 2**32)
            # Enough epochs that even a weight near 1 cannot exhaust it; repeat is lazy.
            .repeat(math.ceil(self._length / len(s)) + 1)
            for i, s in enumerate(self._sources)
        ]
        self._dataset = grain.MapDataset.mix(components, weights)[: self._length]

    @property
    def source_stats(self) -> list[SourceStats]:
        return [st for s in self._sources for st in source_stats(s)]

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict:
        return self._dataset[i]

    def __repr__(self) -> str:
        return f"MixtureSource({self._sources!r}, length={self._length})"


def source_stats(source: Any) -> list[SourceStats]:
    """Index-time stats of a source (empty for a plain sequence or foreign source)."""
    return list(getattr(source, "source_stats", []))


# Config files name sources by string ({"kind": "jsonl", "paths": ...}); STYLE.md rule 4.
SOURCES: dict[str, Callable[..., Any]] = {
    "jsonl": JsonlSource,
    "text": TextSource,
    "arrayrecord": ArrayRecordSource,
    "parquet": ParquetSource,
    "synthetic": SyntheticSource,
}


def make_source(spec: Mapping[str, Any]):
    """Builds a source from a plain dict: {"kind": name, **constructor arguments}, or
    {"kind": "mixture", "components": [spec, ...], "weights": [...], "seed": 0}."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "mixture":
        components = [make_source(c) for c in spec.pop("components")]
        return MixtureSource(components, **spec)
    if kind not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; known: {sorted(SOURCES) + ['mixture']}")
    return SOURCES[kind](**spec)


# ----- post-training files: whole rows, row formats ---------------------------------------------

def _file_kind(path: str, kind: Optional[str]) -> str:
    kind = kind or ("parquet" if path.endswith(".parquet") else "jsonl")
    if kind not in ("jsonl", "parquet"):
        raise ValueError(f"{path}: kind={kind!r}; post-training rows are read from 'jsonl' or 'parquet' files")
    return kind


def read_rows(paths: Paths, kind: Optional[str] = None) -> list[tuple[str, dict]]:
    """Every row of small JSONL/Parquet files with ALL its columns, as (path:line, dict).

    For prompt files (GRPO), whose extra columns are passed to the rewards. Blank lines
    are skipped; anything else that is not a JSON object is an error naming its line,
    so a bad row never shifts which prompt comes at which step.
    """
    rows = []
    for path in expand_paths(paths):
        if _file_kind(path, kind) == "parquet":
            table = _import_pyarrow().read_table(path)
            rows += [(f"{path}:row {i}", r) for i, r in enumerate(table.to_pylist())]
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                rows.append((where, obj))
    if not rows:
        raise ValueError(f"no rows in {paths!r}")
    return rows


def detect_fields(paths: Paths, kind: Optional[str], formats: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Which of `formats` (tuples of column names, first match wins) the file's first row
    has; e.g. (("messages",), ("prompt", "response")) for SFT. Every later row must then
    have the same columns (the source reports a row that does not, by its line)."""
    path = expand_paths(paths)[0]
    if _file_kind(path, kind) == "parquet":
        columns, where = set(_import_pyarrow().read_schema(path).names), path
    else:
        columns, where = None, path
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path}:{lineno}"
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
                    columns = set(obj) if isinstance(obj, dict) else set()
                    break
        if columns is None:
            raise ValueError(f"{path} has no rows")
    for names in formats:
        if set(names) <= columns:
            return tuple(names)
    wanted = " or ".join("{" + ", ".join(map(repr, f)) + "}" for f in formats)
    raise ValueError(f"{where}: the row has columns {sorted(columns)}; expected {wanted}")
