"""Top-K recommendation from an exported bundle with numpy and pyarrow only.

Why a separate, light module: an edge device serves from the compact table without
torch, DGL, Ray or fsspec. This module imports only the standard library, numpy,
pyarrow and light gnaq_dist modules (:mod:`gnaq_dist.bundle` for the layout and the
code decoder, :mod:`gnaq_dist.storage` for its atomic writer, which imports fsspec only
to resolve URIs); it reads a bundle directory written by
:func:`gnaq_dist.export.export_bundle` (a local path), verifies every file's sha256,
and rebuilds the final embeddings with the same maths as
:func:`gnaq_dist.propagation.final_from_packed`: dequantize, propagate over the
symmetric-normalised train graph ``A_hat = D^-1/2 A D^-1/2``, mean of layers 0..L (or,
for tables of already-propagated layers such as BiGeaR's, only weight each group).

Ranking follows :func:`gnaq_dist.evaluation.rank_topk`: all items are scored, a user's
train items score ``-inf`` (they appear, last, only when the user has fewer than ``k``
other items) and ``k`` is capped at the number of items. Scores are summed in float64
and exact ties, which ``torch.topk`` orders arbitrarily, are ordered by item index, so
the lists are deterministic and do not depend on the device's BLAS.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gnaq_dist.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_JSON,
    BUNDLE_VERSION,
    FILE_COLUMNS,
    KIND_FILES,
    LEVEL_DTYPES,
    OPTIONAL_FILES,
    SHARED_FILES,
    SUPPORTED_BITS,
    body_digest,
    dequantize_codes,
    packed_row_bytes,
)
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import unique_pair_keys
from gnaq_dist.storage import atomic_path

_SPMM_ELEMENTS = 1 << 24  # temporary (edges x d) floats per block of rows: 64 MiB


# -- the train graph -------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainGraph:
    """Deduplicated train pairs as a user->items CSR plus ``A_hat`` over all N nodes."""

    n_users: int
    n_items: int
    seen_indptr: np.ndarray  # int64 (n_users + 1,): user -> train items, sorted per row
    seen_indices: np.ndarray  # int64 (E,)
    adj_indptr: np.ndarray  # int64 (N + 1,): rows of A_hat (users, then items)
    adj_indices: np.ndarray  # int64 (2E,)
    adj_values: np.ndarray  # float32 (2E,): 1 / sqrt(deg_row * deg_col)


def _train_graph(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray) -> TrainGraph:
    """CSR forms of the train graph, built like ``gnaq_dist.graph.build_graph_from_arrays``."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if users.size and (users.min() < 0 or users.max() >= n_users or items.min() < 0 or items.max() >= n_items):
        raise GnaqInputError(f"train pairs reference ids outside {n_users} users x {n_items} items")
    keys = unique_pair_keys(users, items, n_items)  # sorted by (user, item), duplicates gone
    u = keys // n_items
    i = keys - u * n_items
    deg_u = np.bincount(u, minlength=n_users)
    deg_i = np.bincount(i, minlength=n_items)
    seen_indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(deg_u, out=seen_indptr[1:])
    by_item = np.argsort(i, kind="stable")  # item rows: users ascending
    degree = np.concatenate([deg_u, deg_i]).astype(np.float64)
    adj_indptr = np.zeros(n_users + n_items + 1, dtype=np.int64)
    np.cumsum(degree.astype(np.int64), out=adj_indptr[1:])
    rows = np.concatenate([u, i[by_item] + n_users])
    cols = np.concatenate([i + n_users, u[by_item]])
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1.0))  # in float64, then float32, as graph.adjacency
    values = (inv_sqrt[cols] * inv_sqrt[rows]).astype(np.float32)
    return TrainGraph(int(n_users), int(n_items), seen_indptr, i, adj_indptr, cols, values)


def spmm(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """CSR matrix times dense ``x`` (float32), in blocks of rows to bound temporary memory."""
    n = indptr.shape[0] - 1
    out = np.zeros((n, x.shape[1]), dtype=np.float32)
    budget = max(1, _SPMM_ELEMENTS // max(x.shape[1], 1))
    start = 0
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        lo, hi = int(indptr[start]), int(indptr[stop])
        if hi > lo:
            prod = x[indices[lo:hi]] * values[lo:hi, None]
            nonempty = start + np.flatnonzero(np.diff(indptr[start : stop + 1]))
            out[nonempty] = np.add.reduceat(prod, indptr[nonempty] - lo, axis=0)
        start = stop
    return out


def propagate_mean(graph: TrainGraph, x0: np.ndarray, num_layers: int) -> np.ndarray:
    """LightGCN's final embedding: mean of ``A_hat^l x0`` for l = 0..L."""
    total = x0.astype(np.float32, copy=True)
    h = x0.astype(np.float32, copy=False)
    for _ in range(num_layers):
        h = spmm(graph.adj_indptr, graph.adj_indices, graph.adj_values, h)
        total += h
    return total / np.float32(num_layers + 1)


def _weight_groups(x: np.ndarray, groups: int, weights: Sequence[float] | None) -> np.ndarray:
    """Tables of already-propagated layers (BiGeaR): scale group g by ``weights[g]``."""
    w = np.asarray(weights if weights is not None else [1.0] * groups, dtype=np.float32)
    n = x.shape[0]
    return (x.reshape(n, groups, -1) * w.reshape(1, -1, 1)).reshape(n, -1)


# -- ranking ---------------------------------------------------------------------------------
def _top_k(
    user_emb: np.ndarray, item_emb: np.ndarray, seen_indptr: np.ndarray, seen_indices: np.ndarray,
    users: np.ndarray, k: int, batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(items, float32 scores), each (len(users), min(k, n_items)): best first, ties by item
    index, seen items at ``-inf``. ``user_emb`` rows are indexed by the ids in ``users``.

    Dot products of the float32 embeddings are taken in float64 (the products are exact,
    the sums nearly so), so the order does not depend on the BLAS or CPU an edge device
    has; only items whose scores agree to ~1e-16 count as tied.
    """
    if k <= 0:
        raise GnaqInputError(f"k must be positive, got {k}")
    users = np.asarray(users, dtype=np.int64)
    n_items = item_emb.shape[0]
    k = min(int(k), n_items)
    items_out = np.zeros((users.shape[0], k), dtype=np.int64)
    scores_out = np.zeros((users.shape[0], k), dtype=np.float32)
    item_t = item_emb.astype(np.float64).T
    for start in range(0, users.shape[0], batch_size):
        bu = users[start : start + batch_size]
        scores = user_emb[bu].astype(np.float64) @ item_t
        for r, u in enumerate(bu):
            scores[r, seen_indices[seen_indptr[u] : seen_indptr[u + 1]]] = -np.inf
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]  # the k-th best score of each row
        for r in range(bu.shape[0]):
            row = scores[r]
            cand = np.flatnonzero(row >= kth[r])  # ascending ids: lexsort keeps them in order on ties
            best = cand[np.lexsort((cand, -row[cand]))[:k]]
            items_out[start + r] = best
            scores_out[start + r] = row[best]
    return items_out, scores_out


# -- reading a bundle ------------------------------------------------------------------------
def _read_info(path: str) -> dict[str, Any]:
    info_path = os.path.join(path, BUNDLE_JSON)
    if not os.path.isdir(path):
        raise GnaqInputError(f"{path}: no such bundle directory")
    try:
        with open(info_path, "rb") as handle:
            info = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise GnaqInputError(f"{info_path}: missing: {path} is not a complete gnaq bundle") from None
    except (ValueError, UnicodeDecodeError):
        raise GnaqInputError(f"{info_path}: not valid JSON (corrupt bundle)") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise GnaqInputError(f"{info_path}: not a {BUNDLE_FORMAT} file")
    if info.get("format_version") != BUNDLE_VERSION:
        raise GnaqInputError(f"{info_path}: format_version {info.get('format_version')!r} is not supported "
                             f"(expected {BUNDLE_VERSION})")
    if info.get("bundle_sha256") != body_digest(info):
        raise GnaqInputError(f"{info_path}: content does not match its bundle_sha256 (corrupt bundle)")
    return info


def _read_file(path: str, name: str, entry: dict[str, Any], verify: bool) -> pa.Table:
    """One listed Parquet file, its size, sha256, row count and columns checked."""
    if not isinstance(entry, dict):
        raise GnaqInputError(f"{os.path.join(path, BUNDLE_JSON)}: the entry of {name} is a "
                             f"{type(entry).__name__}, not an object with path, bytes and sha256")
    fname = entry.get("path")
    fname = fname if isinstance(fname, str) else ""
    if not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
        raise GnaqInputError(f"{os.path.join(path, BUNDLE_JSON)}: bad file name {fname!r} for {name}")
    fpath = os.path.join(path, fname)
    try:
        with open(fpath, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise GnaqInputError(f"{fpath}: file listed in {BUNDLE_JSON} is missing") from None
    if verify:
        if len(data) != entry.get("bytes"):
            raise GnaqInputError(f"{fpath}: {len(data)} bytes, {BUNDLE_JSON} says {entry.get('bytes')} "
                                 "(truncated or replaced)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            raise GnaqInputError(f"{fpath}: sha256 {digest[:12]}... does not match {BUNDLE_JSON} "
                                 f"({str(entry.get('sha256'))[:12]}...): corrupt file")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise GnaqInputError(f"{fpath}: not a readable Parquet file ({exc})") from None
    missing = [c for c in FILE_COLUMNS[name] if c not in table.column_names]
    if missing:
        raise GnaqInputError(f"{fpath}: missing column(s) {', '.join(missing)}")
    if table.num_rows != entry.get("rows"):
        raise GnaqInputError(f"{fpath}: {table.num_rows} rows, {BUNDLE_JSON} says {entry.get('rows')}")
    return table


def _read_tables(path: str, info: dict[str, Any], verify: bool) -> dict[str, pa.Table]:
    """Every file the bundle's kind needs, by bundle.json key, each checked by :func:`_read_file`."""
    files, kind = info.get("files"), info.get("kind")
    needed = KIND_FILES.get(kind) if isinstance(kind, str) else None
    if needed is None:
        raise GnaqInputError(f"{os.path.join(path, BUNDLE_JSON)}: kind must be 'packed' or 'fp', got {kind!r}")
    if not isinstance(files, dict):
        raise GnaqInputError(f"{os.path.join(path, BUNDLE_JSON)}: no 'files' table")
    tables = {}
    for name in (*needed, *SHARED_FILES):
        if name not in files:
            raise GnaqInputError(f"{os.path.join(path, BUNDLE_JSON)}: no {name!r} file listed")
        tables[name] = _read_file(path, name, files[name], verify)
    for name in OPTIONAL_FILES:
        if name in files:
            tables[name] = _read_file(path, name, files[name], verify)
    return tables


def _fixed_width_bytes(column: pa.ChunkedArray, width: int, fpath: str) -> np.ndarray:
    """(rows, width) uint8 view of a fixed_size_binary(width) column."""
    arr = column.combine_chunks()
    if not pa.types.is_fixed_size_binary(arr.type) or arr.type.byte_width != width or arr.null_count:
        raise GnaqInputError(f"{fpath}: expected non-null fixed_size_binary[{width}], got {arr.type}")
    buf = arr.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return flat.reshape(len(arr), width)


def _fixed_list(column: pa.ChunkedArray, width: int, dtype: type, fpath: str) -> np.ndarray:
    """(rows, width) array of a fixed_size_list<dtype>[width] column."""
    arr = column.combine_chunks()
    if not pa.types.is_fixed_size_list(arr.type) or arr.type.list_size != width or arr.null_count:
        raise GnaqInputError(f"{fpath}: expected non-null fixed_size_list[{width}], got {arr.type}")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    if values.dtype != np.dtype(dtype):
        raise GnaqInputError(f"{fpath}: values are {values.dtype}, {BUNDLE_JSON} says {np.dtype(dtype).name}")
    return values.reshape(len(arr), width)


def _int_field(info: dict[str, Any], key: str, minimum: int = 0) -> int:
    value = info.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GnaqInputError(f"{BUNDLE_JSON}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class Bundle:
    """A loaded bundle: final embeddings, raw id maps and the seen-items CSR."""

    path: str
    info: dict[str, Any]
    user_ids: list  # raw id of user index j
    item_ids: list  # raw id of item index j
    embeddings: np.ndarray  # float32 (n_users + n_items, D): final embeddings, users first (+ 2 bias columns)
    graph: TrainGraph
    _user_index: dict | None = field(default=None, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Read and verify a bundle directory, then rebuild the final embeddings."""
        path = os.fspath(path)
        info = _read_info(path)
        files, kind = info["files"], info["kind"]
        tables = _read_tables(path, info, verify)
        n_users, n_items = _int_field(info, "n_users", 1), _int_field(info, "n_items", 1)
        num_layers, dim = _int_field(info, "num_layers"), _int_field(info, "dim", 1)
        train = tables["train"]
        graph = _train_graph(n_users, n_items, train.column("user").to_numpy(), train.column("item").to_numpy())
        x0 = _layer0(path, info, files, tables, n_users + n_items, dim)
        if kind == "fp" or info.get("needs_propagation", True):
            final = propagate_mean(graph, x0, num_layers)
        else:
            final = _weight_groups(x0, int(info["groups"]), info.get("group_weights"))
        final = with_score_bias(final, _bias(path, files, tables, n_users + n_items), n_users)
        users, items = tables["users"].column("raw_id"), tables["items"].column("raw_id")
        if len(users) != n_users or len(items) != n_items:
            raise GnaqInputError(f"{path}: id maps have {len(users)} users / {len(items)} items, "
                                 f"{BUNDLE_JSON} says {n_users} / {n_items}")
        return cls(path, info, users.to_pylist(), items.to_pylist(), final, graph)

    # -- ids -------------------------------------------------------------------------------
    def user_rows(self, raw_user_ids: Iterable[Any]) -> np.ndarray:
        """Internal indices of raw user ids; error naming every unknown id (up to 5)."""
        if self._user_index is None:
            self._user_index = {raw: j for j, raw in enumerate(self.user_ids)}
        as_int = bool(self.user_ids) and isinstance(self.user_ids[0], int)
        rows, unknown = [], []
        for raw in raw_user_ids:
            key = _as_key(raw, as_int)
            j = self._user_index.get(key)
            if j is None:
                unknown.append(raw)
            else:
                rows.append(j)
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            shown = ", ".join(repr(u) for u in unknown[:5]) + more
            raise GnaqInputError(f"unknown user id {shown}: not among the {self.n_users} users of bundle {self.path}")
        return np.asarray(rows, dtype=np.int64)

    # -- serving ---------------------------------------------------------------------------
    def top_k_indices(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, scores) for internal user indices, as :func:`_top_k`."""
        g = self.graph
        return _top_k(self.embeddings[: self.n_users], self.embeddings[self.n_users :], g.seen_indptr,
                     g.seen_indices, users, k)

    def recommend(self, raw_user_ids: Sequence[Any], k: int = 10) -> list[tuple[list, np.ndarray]]:
        """Per raw user id: (raw item ids best first, float32 scores); train items excluded."""
        items, scores = self.top_k_indices(self.user_rows(raw_user_ids), k)
        return [([self.item_ids[i] for i in row], s) for row, s in zip(items, scores)]


def _as_key(raw: Any, as_int: bool) -> Any:
    """A raw id as the map stores it: ints for integer maps (CLI ids arrive as strings)."""
    if as_int:
        if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
            return int(raw)
        try:
            return int(str(raw).strip())
        except ValueError:
            return None
    return raw if isinstance(raw, str) else str(raw)


def _layer0(path: str, info: dict[str, Any], files: dict, tables: dict[str, pa.Table], n: int, dim: int) -> np.ndarray:
    """(N, width) float32 stored table: dequantized codes or the fp32 embeddings."""
    if info["kind"] == "fp":
        fpath = os.path.join(path, files["embeddings"]["path"])
        x = _fixed_list(tables["embeddings"].column("embedding"), dim, np.float32, fpath)
        if x.shape[0] != n:
            raise GnaqInputError(f"{fpath}: {x.shape[0]} rows, expected {n} nodes")
        return x
    bits, groups = _int_field(info, "bits", 1), _int_field(info, "groups", 1)
    if bits not in SUPPORTED_BITS:
        raise GnaqInputError(f"{BUNDLE_JSON}: bits must be 1, 2, 4 or 8, got {bits}")
    dtype = LEVEL_DTYPES.get(str(info.get("level_dtype")))
    if dtype is None:
        raise GnaqInputError(f"{BUNDLE_JSON}: level_dtype must be float16 or float32, got {info.get('level_dtype')!r}")
    cpath = os.path.join(path, files["codes"]["path"])
    codes = _fixed_width_bytes(tables["codes"].column("codes"), packed_row_bytes(groups * dim, bits), cpath)
    lpath = os.path.join(path, files["levels"]["path"])
    levels = _fixed_list(tables["levels"].column("levels"), groups << bits, dtype, lpath)
    if codes.shape[0] != n or levels.shape[0] not in (1, n):
        raise GnaqInputError(f"{path}: {codes.shape[0]} code rows and {levels.shape[0]} level rows for {n} nodes")
    return dequantize_codes(codes, levels.reshape(-1, groups, 1 << bits), bits, groups, dim)


def _bias(path: str, files: dict, tables: dict[str, pa.Table], n: int) -> np.ndarray | None:
    """(N,) float32 per-node score biases (``gnaq``), or None when the bundle has none."""
    if "bias" not in tables:
        return None
    bpath = os.path.join(path, files["bias"]["path"])
    arr = tables["bias"].column("bias").combine_chunks()
    if not pa.types.is_floating(arr.type) or arr.null_count or len(arr) != n:
        raise GnaqInputError(f"{bpath}: expected {n} non-null floats, got {len(arr)} of {arr.type}")
    return arr.to_numpy(zero_copy_only=False).astype(np.float32)


def with_score_bias(final: np.ndarray, bias: np.ndarray | None, n_users: int) -> np.ndarray:
    """Final rows widened so a dot product adds the biases: users ``[h, 1, b_u]``, items
    ``[h, b_i, 1]`` (as training scores, ``gnaq_dist.quant.base.score_rows``)."""
    if bias is None:
        return final
    is_user = np.arange(final.shape[0]) < n_users
    item_col = np.where(is_user, 1.0, bias).astype(final.dtype)
    user_col = np.where(is_user, bias, 1.0).astype(final.dtype)
    return np.concatenate([final, item_col[:, None], user_col[:, None]], axis=1)


# -- batch files -----------------------------------------------------------------------------
def read_user_ids(path: str | os.PathLike) -> list:
    """Raw user ids from a Parquet file (column ``user``) or a text file (one id a line)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except (FileNotFoundError, IsADirectoryError):
        raise GnaqInputError(f"{path}: no such users file") from None
    if head == b"PAR1" or path.endswith(".parquet"):
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise GnaqInputError(f"{path}: not a readable Parquet file ({exc})") from None
        if "user" not in table.column_names:
            raise GnaqInputError(f"{path}: no 'user' column (columns: {', '.join(table.column_names)})")
        ids = table.column("user").to_pylist()
        if not ids or any(u is None for u in ids):
            raise GnaqInputError(f"{path}: the 'user' column is empty or has nulls")
        return ids
    try:
        with open(path, encoding="utf-8") as handle:
            ids = [line.strip() for line in handle if line.strip()]
    except UnicodeDecodeError:
        raise GnaqInputError(f"{path}: neither Parquet nor UTF-8 text with one user id a line") from None
    if not ids:
        raise GnaqInputError(f"{path}: no user ids")
    return ids


def recommendations_table(bundle: Bundle, raw_user_ids: Sequence[Any], k: int) -> pa.Table:
    """Long form ``user, rank (1 = best), item, score`` with the bundle's raw ids."""
    rows = bundle.user_rows(raw_user_ids)
    items, scores = bundle.top_k_indices(rows, k)
    kk = items.shape[1]
    return pa.table({
        "user": pa.array([bundle.user_ids[u] for u in np.repeat(rows, kk)]),
        "rank": pa.array(np.tile(np.arange(1, kk + 1, dtype=np.int32), rows.shape[0])),
        "item": pa.array([bundle.item_ids[i] for i in items.reshape(-1)]),
        "score": pa.array(scores.reshape(-1)),
    })


#: The columns of a recommendation list (:func:`recommendations_table`), in order.
RECOMMENDATION_COLUMNS = ("user", "rank", "item", "score")


def _output_file(path: str | os.PathLike) -> str:
    """``path`` made absolute, refused (one line) where it is a directory or its folder is missing."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise GnaqInputError(f"{path}: is a directory, expected an output file name")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise GnaqInputError(f"{parent}: output directory does not exist")
    return path


def check_output(path: str | os.PathLike, columns: Sequence[str] = RECOMMENDATION_COLUMNS) -> None:
    """Refuse (one line) an output file name that would replace something other than a list
    with ``columns`` that this writer wrote: ``--output`` used to replace any file, a raw
    interaction log included. A Parquet file is recognised by its columns, a CSV file by its
    header line; a directory or a missing parent directory is refused too."""
    import pyarrow.csv as pacsv

    path = _output_file(path)
    if not os.path.lexists(path):
        return
    found: list[str] | None = None
    try:
        if path.endswith(".parquet"):
            found = pq.read_schema(path).names
        else:
            with open(path, "rb") as handle:
                first = handle.readline()
            header = io.BytesIO()
            pacsv.write_csv(pa.table({c: pa.array([], pa.string()) for c in columns}), header)
            found = list(columns) if first == header.getvalue().splitlines(keepends=True)[0] else None
    except (OSError, pa.ArrowInvalid):
        found = None
    if found != list(columns):
        raise GnaqInputError(f"{path}: exists and is not a recommendation list ({', '.join(columns)}) that gnaq "
                             f"wrote; it is left as it is: choose another --output, or remove it")


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Parquet if ``path`` ends in .parquet, CSV otherwise; all or nothing
    (:func:`gnaq_dist.storage.atomic_path`), so a failed write leaves no partial output."""
    import pyarrow.csv as pacsv

    path = _output_file(path)
    with atomic_path(path) as tmp:
        if path.endswith(".parquet"):
            pq.write_table(table, tmp)
        else:
            pacsv.write_csv(table, tmp)


__all__ = [
    "RECOMMENDATION_COLUMNS", "Bundle", "TrainGraph", "check_output", "propagate_mean", "read_user_ids",
    "recommendations_table", "spmm", "write_table_atomic",
]
