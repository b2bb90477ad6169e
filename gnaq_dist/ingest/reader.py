"""Streamed reading of Parquet interaction logs from any fsspec location.

The source is resolved once (file, directory, glob, Hive tree), every file's footer is
checked before any row is read (so a bad file is named before work is wasted), and rows
are then streamed file by file in record batches: only mapped int/float numpy chunks of
the kept rows are retained.
"""

from __future__ import annotations

import hashlib
import posixpath
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyarrow.types as pat
def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.ingest.config import IngestConfig
from gnaq_dist.ingest.edges import TEST, TRAIN, TS_MAX, TS_MIN, TS_NULL, VALID, Edges
from gnaq_dist.ingest.idmap import IdMap
from gnaq_dist.storage import arrow_fs, resolve


@dataclass
class SourceFile:
    path: str
    size: int
    stamp: str  # etag or mtime: part of the source fingerprint
    rows: int = 0
    schema: pa.Schema | None = None


@dataclass
class Source:
    uri: str
    fs: Any
    base: str
    files: list[SourceFile]
    partition_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            digest.update(f"{f.path}\0{f.size}\0{f.stamp}\n".encode())
        return digest.hexdigest()


def _stamp(info: dict) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def _list_files(uri: str, storage_options: dict | None = None) -> tuple[Any, str, list[SourceFile]]:
    """Source URI (file, directory, glob) -> (fs, partition base dir, files); hidden files skipped."""
    fs, path = resolve(uri, storage_options)
    try:
        if _has_magic(path):
            base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            found = fs.glob(path, detail=True)
            infos = {p: i for p, i in found.items() if i.get("type") == "file"}
            for p, i in found.items():
                if i.get("type") == "directory":
                    infos.update(fs.find(p, detail=True))
        elif fs.isdir(path):
            base = path
            infos = fs.find(path, detail=True)
        elif fs.exists(path):
            base = posixpath.dirname(path)
            infos = {path: fs.info(path)}
        else:
            raise GnaqInputError(f"{uri}: path not found")
    except FileNotFoundError:
        raise GnaqInputError(f"{uri}: path not found") from None
    files = [
        SourceFile(p, int(i.get("size") or 0), _stamp(i))
        for p, i in sorted(infos.items())
        if not _hidden(p[len(base):] if p.startswith(base) else posixpath.basename(p))
    ]
    if not files:
        raise GnaqInputError(f"{uri}: path not found (no data files there)")
    return fs, base, files


def open_source(uri: str, storage_options: dict | None = None) -> Source:
    """Resolve the source and read every file's footer (row counts, schema)."""
    fs, base, files = _list_files(uri, storage_options)
    afs = arrow_fs(fs)
    for f in files:
        try:
            meta = pq.ParquetFile(afs.open_input_file(f.path)).metadata
            f.rows = meta.num_rows
            f.schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise GnaqInputError(f"{f.path}: not a Parquet file ({str(exc).splitlines()[0][:120]})") from None
    dataset = ds.dataset([f.path for f in files], filesystem=afs, format="parquet", partitioning="hive", partition_base_dir=base)
    # partitioning.schema can echo data columns when there are no keys: keep real keys only
    keys = {
        part.split("=", 1)[0]
        for f in files
        for part in f.path[len(base):].split("/")[:-1]
        if "=" in part
    }
    found = dataset.partitioning.schema if dataset.partitioning is not None else pa.schema([])
    part = pa.schema([found.field(k) for k in found.names if k in keys])
    return Source(uri, fs, base, files, part)


# -- column type rules -------------------------------------------------------------------
def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pat.is_dictionary(t) else t


def _is_str(t: pa.DataType) -> bool:
    return pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t)


def _id_kind(t: pa.DataType) -> str | None:
    v = _value_type(t)
    if _is_str(v):
        return "string"
    if pat.is_integer(v):
        return "int"
    return None


def _check_schema(f: SourceFile, schema: pa.Schema, config: IngestConfig, kinds: dict[str, str]) -> set[str]:
    """Validate one file's columns; returns the optional columns it has."""
    cols = config.columns
    have: set[str] = set()
    for role in ("user", "item"):
        name = getattr(cols, role)
        if name not in schema.names:
            raise GnaqInputError(f"{f.path}: missing {role} column {name!r} (columns: {', '.join(schema.names)})")
        kind = _id_kind(schema.field(name).type)
        if kind is None:
            raise GnaqInputError(
                f"{f.path}: column {name!r} has unsupported type {schema.field(name).type} (ids must be string or integer)"
            )
        if kinds.setdefault(role, kind) != kind:
            raise GnaqInputError(f"{f.path}: column {name!r} holds {kind} ids but earlier files hold {kinds[role]} ids")
    if cols.timestamp and cols.timestamp in schema.names:
        t = _value_type(schema.field(cols.timestamp).type)
        if not (pat.is_timestamp(t) or pat.is_date(t) or pat.is_integer(t)):
            raise GnaqInputError(
                f"{f.path}: column {cols.timestamp!r} has type {t} (expected timestamp, date or integer unix seconds)"
            )
        have.add("timestamp")
    if cols.weight:
        if cols.weight not in schema.names:
            raise GnaqInputError(f"{f.path}: missing weight column {cols.weight!r}")
        t = _value_type(schema.field(cols.weight).type)
        if not (pat.is_integer(t) or pat.is_floating(t) or pat.is_decimal(t)):
            raise GnaqInputError(f"{f.path}: column {cols.weight!r} has type {t} (expected a number)")
    for role, needed in (("event", config.keep_events is not None), ("split", config.split.strategy == "column")):
        name = getattr(cols, role)
        if name and needed:
            if name not in schema.names:
                raise GnaqInputError(f"{f.path}: missing {role} column {name!r} (columns: {', '.join(schema.names)})")
            t = _value_type(schema.field(name).type)
            if not (_is_str(t) or pat.is_integer(t)):
                raise GnaqInputError(f"{f.path}: column {name!r} has type {t} (expected string labels)")
    return have


# -- per-batch conversion ----------------------------------------------------------------
def _plain(arr: pa.Array) -> pa.Array:
    return arr.dictionary_decode() if pat.is_dictionary(arr.type) else arr


def _as_str(arr: pa.Array) -> pa.Array:
    arr = _plain(arr)
    return arr if _is_str(arr.type) else arr.cast(pa.string())


def _ids(arr: pa.Array, kind: str) -> pa.Array:
    arr = _plain(arr)
    if kind == "int":
        return arr.cast(pa.int64())
    return arr if pat.is_string(arr.type) else arr.cast(pa.string())


def _bad_ids(arr: pa.Array, kind: str) -> tuple[int, int]:
    nulls = arr.null_count
    empty = 0
    if kind == "string":
        empty = int(pc.sum(pc.equal(arr, "")).as_py() or 0)
    return nulls, empty


# -- value checks (rows are counted from 0 in file order) ---------------------------------
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class Rows:
    """Where a batch's rows sit in their file: ``start`` + the batch row, or + ``picked``
    (the rows an event filter kept) when given."""

    start: int = 0
    picked: np.ndarray | None = None

    def of(self, k: int) -> int:
        return self.start + int(self.picked[k] if self.picked is not None else k)


def _first(mask: pa.Array | np.ndarray) -> tuple[int, int]:
    """(index of the first True, number of Trues) of a boolean mask (nulls count as False)."""
    if isinstance(mask, (pa.Array, pa.ChunkedArray)):
        mask = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    hits = np.flatnonzero(mask)
    return (int(hits[0]) if hits.size else -1), int(hits.size)


def _check_int64_range(arr: pa.Array, path: str, name: str, rows: Rows, what: str) -> None:
    """Unsigned 64-bit values above the int64 range cannot be ids or unix seconds."""
    if pat.is_uint64(arr.type) and len(arr):
        k, count = _first(pc.greater(arr, pa.scalar(INT64_MAX, pa.uint64())))
        if k >= 0:
            raise GnaqInputError(f"{path}: column {name!r} row {rows.of(k)}: {what} {arr[k].as_py()} is above the "
                                 f"int64 range ({count} such rows in a batch)")


def _check_utf8(arr: pa.Array, path: str, name: str, rows: Rows, what: str) -> None:
    """String values must be valid UTF-8 (Parquet does not check it; invalid bytes break
    the id maps' Python strings, or worse)."""
    if not _is_str(arr.type):
        return
    try:
        arr.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    try:
        values = arr.cast(pa.large_binary() if pat.is_large_string(arr.type) else pa.binary()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise GnaqInputError(f"{path}: column {name!r}: a {what} is not valid UTF-8 (rows from {rows.of(0)})") from None
    bad = []
    for k, value in enumerate(values):
        if value is None:
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(k)
    if bad:
        raise GnaqInputError(f"{path}: column {name!r} row {rows.of(bad[0])}: {what} {values[bad[0]][:40]!r} is not "
                             f"valid UTF-8 ({len(bad)} such rows in a batch)")


def _checked_unix_seconds(arr: pa.Array, path: str, name: str, rows: Rows) -> np.ndarray:
    """:func:`_to_unix_seconds` of a column whose non-null values must lie in 0001-01-01 ..
    9999-12-31 (what datetime and an ISO cutoff can name): -2**63, the missing-time
    sentinel, is not silently read as null, and 2**62 seconds is not a time."""
    arr = _plain(arr)
    _check_int64_range(arr, path, name, rows, "timestamp")
    vals = _to_unix_seconds(arr)
    out = (vals < TS_MIN) | (vals > TS_MAX)
    if arr.null_count:
        out &= ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    k, count = _first(out)
    if k >= 0:
        raise GnaqInputError(f"{path}: column {name!r} row {rows.of(k)}: timestamp {int(vals[k])} unix seconds is "
                             f"outside years 1..9999 (milliseconds or nanoseconds need a timestamp type; "
                             f"{count} such rows in a batch)")
    return vals


def _checked_weights(arr: pa.Array, path: str, name: str, rows: Rows) -> np.ndarray:
    """Weights as float32: nulls, NaN, infinities and values float32 cannot hold are refused."""
    w = _plain(arr)
    if w.null_count:
        k, _ = _first(w.is_null())
        raise GnaqInputError(f"{path}: column {name!r} has {w.null_count} null weights in a batch "
                             f"(first at row {rows.of(k)})")
    weight = np.asarray(w.cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False), dtype=np.float32)
    k, count = _first(~np.isfinite(weight))
    if k >= 0:
        raise GnaqInputError(f"{path}: column {name!r} row {rows.of(k)}: weight {w[k].as_py()!r} is not a finite "
                             f"float32 (NaN and infinities are refused like nulls; {count} such rows in a batch)")
    return weight


def _to_unix_seconds(arr: pa.Array) -> np.ndarray:
    """timestamp[*] / date32 / date64 / integer -> int64 unix seconds (TS_NULL for nulls)."""
    arr = _plain(arr)
    t = arr.type
    if pat.is_timestamp(t):
        per_s = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]
        raw = arr.cast(pa.int64())
        vals = raw.fill_null(0).to_numpy(zero_copy_only=False) // per_s
    elif pat.is_date32(t):
        raw = arr.cast(pa.int32()).cast(pa.int64())
        vals = raw.fill_null(0).to_numpy(zero_copy_only=False) * 86_400
    elif pat.is_date64(t):
        raw = arr.cast(pa.int64())
        vals = raw.fill_null(0).to_numpy(zero_copy_only=False) // 1_000
    else:
        raw = arr.cast(pa.int64())
        vals = raw.fill_null(0).to_numpy(zero_copy_only=False)
    vals = np.asarray(vals, dtype=np.int64)
    if raw.null_count:
        vals = vals.copy()
        vals[np.asarray(raw.is_null().to_numpy(zero_copy_only=False))] = TS_NULL
    return vals


@dataclass
class ReadStats:
    rows_read: int = 0
    filtered_by_event: int = 0
    has_timestamp: bool = False


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr, disable=not enabled, desc="ingest", smoothing=0.1)


def read_parquet(source: Source, config: IngestConfig, users: IdMap, items: IdMap) -> tuple[Edges, ReadStats]:
    """Validate all files, then stream them, mapping ids into ``users`` / ``items``."""
    cols = config.columns
    kinds: dict[str, str] = {}
    if users.kind:
        kinds["user"] = users.kind
    if items.kind:
        kinds["item"] = items.kind
    has: dict[str, set[str]] = {}
    for f in source.files:
        extra = [fld for fld in source.partition_schema if fld.name not in f.schema.names]
        schema = pa.schema(list(f.schema) + extra) if extra else f.schema
        f.schema = schema
        try:
            has[f.path] = _check_schema(f, schema, config, kinds)
        except GnaqInputError as exc:
            if users.kind and str(exc).find("earlier files") >= 0:
                raise GnaqInputError(str(exc).replace("earlier files", "the existing dataset")) from None
            raise
    with_ts = [p for p, h in has.items() if "timestamp" in h]
    if with_ts and len(with_ts) != len(has):
        missing = next(p for p, h in has.items() if "timestamp" not in h)
        raise GnaqInputError(f"{missing}: missing timestamp column {cols.timestamp!r} (other files have it)")
    use_ts = bool(with_ts)
    if config.split.strategy.startswith("temporal") and not use_ts and config.format == "parquet":
        raise GnaqInputError(
            f"{source.files[0].path}: missing timestamp column {cols.timestamp!r} (split {config.split.strategy!r} needs it)"
        )
    users.kind, items.kind = kinds["user"], kinds["item"]
    use_event = config.keep_events is not None
    use_split = config.split.strategy == "column"
    names = [cols.user, cols.item]
    for flag, name in ((use_ts, cols.timestamp), (bool(cols.weight), cols.weight), (use_event, cols.event), (use_split, cols.split)):
        if flag and name not in names:
            names.append(name)
    keep = pa.array(config.keep_events or [], type=pa.string())
    labels = {config.split.train_value: TRAIN, config.split.test_value: TEST, config.split.valid_value: VALID}
    label_set = pa.array(list(labels), type=pa.string())
    label_codes = np.array(list(labels.values()), dtype=np.int8)

    stats = ReadStats(has_timestamp=use_ts)
    parts: list[Edges] = []
    afs = arrow_fs(source.fs)
    bar = _progress(source.total_rows, config.progress)
    try:
        for f in source.files:
            dataset = ds.dataset(f.path, filesystem=afs, format="parquet", partitioning="hive", partition_base_dir=source.base)
            fragment = next(iter(dataset.get_fragments()))
            scanner = fragment.scanner(schema=f.schema, columns=names, batch_size=config.batch_rows, use_threads=True)
            offset, rows = 0, Rows(0)
            batches = scanner.to_batches()
            try:
                for batch in batches:
                    raw = batch
                    n = batch.num_rows
                    rows, offset = Rows(offset), offset + n
                    stats.rows_read += n
                    bar.update(n)
                    if n == 0:
                        continue
                    if use_event:
                        mask = pc.fill_null(pc.is_in(_as_str(batch.column(cols.event)), value_set=keep), False)
                        rows.picked = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
                        batch = batch.filter(mask)
                        stats.filtered_by_event += n - batch.num_rows
                        if batch.num_rows == 0:
                            continue
                    try:
                        parts.append(_convert(batch, f, config, users, items, use_ts, use_split, label_set,
                                              label_codes, rows))
                    except _MissingIds as missing:
                        raise missing.counted(raw, rows.start, batches) from None
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
                # a corrupt page or an undecodable value: the file, not a traceback
                first = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
                raise GnaqInputError(f"{f.path}: cannot read the rows at or after row {rows.start} ({first})") from None
    finally:
        bar.close()
    return Edges.concat(parts), stats


class _MissingIds(Exception):
    """Null or empty ids in a batch; :meth:`counted` turns it into the error for the whole file."""

    def __init__(self, path: str, name: str, role: str, kind: str) -> None:
        self.path, self.name, self.role, self.kind = path, name, role, kind

    def counted(self, raw: pa.RecordBatch, start: int, rest) -> GnaqInputError:
        """The file's totals, counted over this batch (``raw``, before any event filter, at file row
        ``start``) and the rest of the same scan. Not a second scan of the file: one started while
        the first was open made the process abort at exit now and then ("terminate called")."""
        nulls = empty = total = 0
        first = -1
        for batch in _chain(raw, rest):
            arr = _ids(batch.column(self.name), self.kind)
            n_null, n_empty = _bad_ids(arr, self.kind)
            if first < 0 and (n_null or n_empty):
                bad = pc.or_kleene(arr.is_null(), pc.equal(arr, "")) if self.kind == "string" else arr.is_null()
                first = start + total + _first(bad)[0]
            nulls, empty, total = nulls + n_null, empty + n_empty, total + batch.num_rows
        return GnaqInputError(f"{self.path}: column {self.name!r} has {nulls} null and {empty} empty-string "
                              f"{self.role} ids (of {start + total} rows; first at row {first})")


def _chain(first, rest):
    yield first
    yield from rest


def _convert(batch, f, config, users, items, use_ts, use_split, label_set, label_codes,
             rows: Rows | None = None) -> Edges:
    cols = config.columns
    rows = rows or Rows()
    mapped = []
    for role, idmap in (("user", users), ("item", items)):
        name = getattr(cols, role)
        plain = _plain(batch.column(name))
        if idmap.kind == "int":
            _check_int64_range(plain, f.path, name, rows, f"{role} id")
        else:
            _check_utf8(plain, f.path, name, rows, f"{role} id")
        arr = _ids(plain, idmap.kind)
        if any(_bad_ids(arr, idmap.kind)):
            raise _MissingIds(f.path, name, role, idmap.kind)
        mapped.append(idmap.map(arr).astype(np.int32))
    ts = _checked_unix_seconds(batch.column(cols.timestamp), f.path, cols.timestamp, rows) if use_ts else None
    weight = _checked_weights(batch.column(cols.weight), f.path, cols.weight, rows) if cols.weight else None
    label = None
    if use_split:
        _check_utf8(_plain(batch.column(cols.split)), f.path, cols.split, rows, "split label")
        values = _as_str(batch.column(cols.split))
        pos = pc.index_in(values, value_set=label_set)
        if pos.null_count:
            bad = pc.filter(values, pos.is_null())
            first = bad[0].as_py()
            raise GnaqInputError(
                f"{f.path}: column {cols.split!r} has value {first!r} "
                f"(expected {', '.join(repr(v) for v in label_set.to_pylist())}; {len(bad)} such rows in a batch)"
            )
        label = label_codes[pos.to_numpy(zero_copy_only=False)]
    return Edges(mapped[0], mapped[1], ts, weight, label)
