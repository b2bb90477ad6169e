"""Export a trained table as an edge bundle: Parquet files plus ``bundle.json``.

Why: an edge device serves top-K from the compact quantized table without a cluster
(:mod:`gnaq_dist.serving` reads the bundle with numpy and pyarrow only). The bundle is
one directory at any fsspec URI:

* ``codes.parquet`` (packed) — ``codes``: fixed_size_binary, one row per node, users
  first then items, the packed b-bit codes exactly as :class:`PackedTable` stores them;
* ``levels.parquet`` (packed) — ``levels``: fixed_size_list of float16/float32 (the
  stored dtype), ``groups * 2**bits`` values per node, or a single row for a shared
  codebook;
* ``embeddings.parquet`` (fp) — ``embedding``: fixed_size_list<float32>[d] per node;
* ``users.parquet`` / ``items.parquet`` — ``raw_id``: row j holds the raw id of index j;
* ``train.parquet`` — ``user``, ``item`` (int32, internal ids, deduplicated and sorted):
  the graph to propagate over and the items to exclude per user;
* ``bundle.json`` — written LAST (the commit mark): format, method, shapes, the
  dataset fingerprint, ``meta``, the size report, and the sha256/size of every file.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import InteractionData, unique_pair_keys
from gnaq_dist.quant.packing import PackedTable
from gnaq_dist.serving import BUNDLE_FORMAT, BUNDLE_JSON, BUNDLE_VERSION, body_digest
from gnaq_dist.storage import is_local, join, output_exists, resolve, sha256_of

KINDS = ("packed", "fp")


class _BundleOutput:
    """Write a bundle directory so that it appears complete or not at all.

    Local: files go to a hidden sibling staging directory that is renamed into place.
    Elsewhere: files are written under names the existing bundle does not use,
    ``bundle.json`` last, then the old bundle's files are removed. Leaving the block
    without :meth:`commit` removes everything this attempt wrote.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None, overwrite: bool) -> None:
        self.uri = uri
        self.fs, self.path = resolve(uri, storage_options)
        self.local = is_local(self.fs)
        self.overwrite = overwrite
        self.written: list[str] = []
        self.taken: set[str] = set()
        self.committed = False

    def __enter__(self) -> _BundleOutput:
        exists = output_exists(self.fs, self.path)
        if exists and not self.overwrite:
            raise GnaqInputError(f"{self.uri}: already exists; pass --overwrite (overwrite=True) to replace it")
        if exists and not self.fs.isdir(self.path):
            raise GnaqInputError(f"{self.uri}: exists and is a file, not a bundle directory")
        if self.local:
            parent, name = os.path.split(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self.stage = os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")
            os.makedirs(self.stage)
        else:
            self.stage = self.path
            if exists:
                self.taken = {posixpath.basename(p) for p in self.fs.ls(self.path, detail=False)}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        if self.local:
            shutil.rmtree(self.stage, ignore_errors=True)
        else:
            for path in self.written:
                try:
                    self.fs.rm(path)
                except (FileNotFoundError, OSError):
                    pass

    def _target(self, name: str) -> str:
        return os.path.join(self.stage, name) if self.local else join(self.stage, name)

    def write_parquet(self, name: str, table: pa.Table, plain_columns: tuple[str, ...] = ()) -> dict[str, Any]:
        """Write ``table`` as ``name`` (a fresh name if the old bundle uses it); its bundle.json entry."""
        if name in self.taken:
            stem, ext = name.split(".", 1)
            name = f"{stem}.{uuid.uuid4().hex[:8]}.{ext}"
        path = self._target(name)
        self.written.append(path)
        # Codes and levels are near-random bytes: dictionaries and statistics only add size.
        dictionary = [c for c in table.column_names if c not in plain_columns]
        with self.fs.open(path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd", use_dictionary=dictionary,
                           write_statistics=dictionary)
        return {"path": name, "rows": table.num_rows, "bytes": int(self.fs.size(path)),
                "sha256": sha256_of(self.fs, path)}

    def commit(self, info: dict[str, Any]) -> None:
        """Write bundle.json (the commit mark) and make the new bundle the visible one."""
        data = json.dumps(info, indent=2).encode("utf-8")
        if not self.local:
            with self.fs.open(join(self.path, BUNDLE_JSON), "wb") as handle:
                handle.write(data)
            self.committed = True
            keep = {entry["path"] for entry in info["files"].values()} | {BUNDLE_JSON}
            for name in sorted(self.taken - keep):
                try:
                    self.fs.rm(join(self.path, name), recursive=True)
                except (FileNotFoundError, OSError):
                    pass
            return
        with open(os.path.join(self.stage, BUNDLE_JSON), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        target = os.path.abspath(self.path)
        aside = None
        if os.path.lexists(target):
            if os.path.isdir(target) and not os.listdir(target):
                os.rmdir(target)
            else:
                parent, name = os.path.split(target)
                aside = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
                os.rename(target, aside)
        try:
            os.rename(self.stage, target)
        except BaseException:
            if aside is not None:
                os.rename(aside, target)
            raise
        self.committed = True
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


# -- columns ---------------------------------------------------------------------------------
def _fixed_binary(rows: np.ndarray) -> pa.Array:
    """(R, w) uint8 -> fixed_size_binary[w], one value per row, zero-copy."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    width = max(int(rows.shape[1]), 1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), rows.shape[0], [None, pa.py_buffer(rows)])


def _fixed_list(rows: np.ndarray) -> pa.Array:
    """(R, w) float array -> fixed_size_list<float>[w] in the array's own dtype."""
    rows = np.ascontiguousarray(rows)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), int(rows.shape[1]))


def _raw_ids(values: Any, n: int, what: str) -> pa.Array:
    """Raw ids as an arrow array of length ``n`` (internal indices when none are given)."""
    if values is None:
        return pa.array(np.arange(n, dtype=np.int64))
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else pa.array(values)
    if len(arr) != n or arr.null_count:
        raise GnaqInputError(f"{what} id map has {len(arr)} entries ({arr.null_count} null), the data {n} {what}s")
    if not (pa.types.is_integer(arr.type) or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise GnaqInputError(f"{what} raw ids must be strings or integers, got {arr.type}")
    if pa.types.is_integer(arr.type):
        arr = arr.cast(pa.int64())
    return arr


def _train_pairs(data: InteractionData) -> pa.Table:
    """Deduplicated train pairs sorted by (user, item), int32."""
    if data.n_users >= 2**31 or data.n_items >= 2**31:
        raise GnaqInputError("bundles store int32 ids: more than 2**31 users or items")
    u, i = np.asarray(data.train_user, np.int64), np.asarray(data.train_item, np.int64)
    if u.size and (u.min() < 0 or u.max() >= data.n_users or i.min() < 0 or i.max() >= data.n_items):
        raise GnaqInputError(f"train pairs reference ids outside {data.n_users} users x {data.n_items} items")
    keys = unique_pair_keys(u, i, data.n_items)
    users = keys // data.n_items
    return pa.table({"user": pa.array(users.astype(np.int32)),
                     "item": pa.array((keys - users * data.n_items).astype(np.int32))})


def _as_float32_table(table: Any, n: int) -> np.ndarray:
    """An fp table (torch tensor or numpy array) as a float32 (N, d) numpy array."""
    if hasattr(table, "detach"):
        table = table.detach().cpu().numpy()
    x = np.asarray(table)
    if x.ndim != 2 or x.shape[0] != n or x.shape[1] < 1:
        raise GnaqInputError(f"fp table must be ({n}, d), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise GnaqInputError("fp table has non-finite values")
    return x.astype(np.float32, copy=False)


# -- the bundle ------------------------------------------------------------------------------
def _embedding_tables(kind: str, table: Any, n: int) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """The embedding files and the bundle.json fields that describe them."""
    if kind == "fp":
        x = _as_float32_table(table, n)
        return ({"embeddings": pa.table({"embedding": _fixed_list(x)})},
                {"method": "fp", "bits": None, "dim": int(x.shape[1]), "groups": 1, "needs_propagation": True,
                 "group_weights": None, "level_dtype": None, "levels_shared": False,
                 "embedding_bytes": int(x.shape[0] * x.shape[1] * 4), "code_bytes": 0, "level_bytes": 0})
    if not isinstance(table, PackedTable):
        raise GnaqInputError(f"kind 'packed' needs a PackedTable, got {type(table).__name__}")
    if table.num_rows != n:
        raise GnaqInputError(f"packed table has {table.num_rows} rows, the data {n} nodes")
    if not np.all(np.isfinite(table.levels)):
        raise GnaqInputError("packed table has non-finite levels")
    levels = table.levels.reshape(table.levels.shape[0], -1)
    return ({"codes": pa.table({"codes": _fixed_binary(table.codes)}),
             "levels": pa.table({"levels": _fixed_list(levels)})},
            {"method": table.method, "bits": table.bits, "dim": table.dim, "groups": table.groups,
             "needs_propagation": table.needs_propagation, "group_weights": table.group_weights,
             "level_dtype": np.dtype(table.levels.dtype).name, "levels_shared": table.levels.shape[0] == 1,
             "embedding_bytes": table.bytes_total(), "code_bytes": table.code_bytes(),
             "level_bytes": table.level_bytes()})


def size_report(fields: dict[str, Any], files: dict[str, dict[str, Any]], n: int) -> dict[str, Any]:
    """Embedding bytes (codes + levels, as stored in memory) per node and in total against
    fp32 (4*d bytes a node), plus the bytes on disk of the embedding files, id maps and graph."""
    fp32 = n * 4 * fields["dim"]
    emb = fields["embedding_bytes"]

    def disk(*names: str) -> int:
        return sum(files[k]["bytes"] for k in names if k in files)

    return {
        "n_nodes": n,
        "embedding_bytes": emb,
        "embedding_bytes_per_node": emb / n,
        "code_bytes_per_node": fields["code_bytes"] / n,
        "level_bytes_per_node": fields["level_bytes"] / n,
        "fp32_bytes": fp32,
        "fp32_bytes_per_node": 4.0 * fields["dim"],
        "compression_ratio": fp32 / max(emb, 1),
        "embedding_file_bytes": disk("codes", "levels", "embeddings"),
        "id_map_file_bytes": disk("users", "items"),
        "graph_file_bytes": disk("train"),
        "total_file_bytes": disk(*files),
    }


def export_bundle(
    out_uri: str,
    kind: str,
    table: Any,
    data: InteractionData,
    num_layers: int,
    meta: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    *,
    id_maps: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Write the bundle of ``table`` to ``out_uri``; returns the size report.

    ``kind`` is "packed" (``table`` a PackedTable) or "fp" (a float32 (N, d) tensor or
    array). ``id_maps`` = (user raw ids, item raw ids) as :func:`gnaq_dist.dataset.load_id_maps`
    returns them; without it the raw ids are the internal indices. Refuses an existing
    ``out_uri`` unless ``overwrite``; on any error nothing is left behind.
    """
    if kind not in KINDS:
        raise GnaqInputError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(num_layers, int) or num_layers < 0:
        raise GnaqInputError(f"num_layers must be an integer >= 0, got {num_layers!r}")
    try:
        meta = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise GnaqInputError(f"meta must be JSON-serialisable: {exc}") from None
    n = data.n_users + data.n_items
    emb_tables, fields = _embedding_tables(kind, table, n)
    if kind == "packed" and not fields["needs_propagation"] and fields["groups"] != num_layers + 1:
        raise GnaqInputError(f"table has {fields['groups']} propagated layers, num_layers={num_layers} needs "
                             f"{num_layers + 1}")
    users_raw, items_raw = id_maps if id_maps is not None else (None, None)
    tables = {
        **emb_tables,
        "users": pa.table({"raw_id": _raw_ids(users_raw, data.n_users, "user")}),
        "items": pa.table({"raw_id": _raw_ids(items_raw, data.n_items, "item")}),
        "train": _train_pairs(data),
    }
    with _BundleOutput(out_uri, storage_options, overwrite) as out:
        files = {name: out.write_parquet(f"{name}.parquet", t, plain_columns=("codes", "levels", "embedding"))
                 for name, t in tables.items()}
        report = size_report(fields, files, n)
        info: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "kind": kind,
            **{k: fields[k] for k in ("method", "bits", "dim", "groups", "needs_propagation", "group_weights",
                                     "level_dtype", "levels_shared")},
            "num_layers": num_layers, "n_users": data.n_users, "n_items": data.n_items,
            "n_train_pairs": tables["train"].num_rows,
            "raw_ids": "dataset" if id_maps is not None else "internal",
            "dataset": {"fingerprint": data.fingerprint, "name": data.name},
            "meta": meta, "size_report": report, "files": files,
        }
        info["bundle_sha256"] = body_digest(info)
        out.commit(info)
    return report


#: Checkpoint manifest entries copied into the bundle's ``meta``.
CHECKPOINT_META = ("step", "epoch", "phase", "shard_method", "world_size", "created")


def export_checkpoint(
    checkpoint_uri: str, out_uri: str, overwrite: bool = False, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``gnaq export``: the checkpoint's table, its dataset's raw ids and train graph, as a bundle."""
    from gnaq_dist.checkpoint import load_for_export
    from gnaq_dist.dataset import load_id_maps

    manifest, kind, table, data = load_for_export(checkpoint_uri, storage_options=storage_options)
    config = manifest.get("config") or {}
    model = manifest.get("model") or config.get("model") or {}
    if "num_layers" not in model:
        raise GnaqInputError(f"{checkpoint_uri}: the manifest has no model.num_layers")
    id_maps = load_id_maps(config["dataset"], config.get("storage_options") or None) if config.get("dataset") else None
    meta = {"checkpoint": str(checkpoint_uri), **{k: manifest[k] for k in CHECKPOINT_META if k in manifest}}
    return export_bundle(out_uri, kind, table, data, int(model["num_layers"]), meta, storage_options, overwrite,
                         id_maps=id_maps)


def format_size_report(report: dict[str, Any]) -> str:
    """A few human lines for the CLI."""
    kib = 1024.0
    return "\n".join([
        f"embedding table: {report['embedding_bytes_per_node']:.2f} bytes/node "
        f"(codes {report['code_bytes_per_node']:.2f} + levels {report['level_bytes_per_node']:.2f}) "
        f"vs fp32 {report['fp32_bytes_per_node']:.0f} -> {report['compression_ratio']:.2f}x smaller; "
        f"{report['embedding_bytes'] / kib:.1f} KiB vs {report['fp32_bytes'] / kib:.1f} KiB for "
        f"{report['n_nodes']} nodes",
        f"files on disk: embedding {report['embedding_file_bytes'] / kib:.1f} KiB, "
        f"id maps {report['id_map_file_bytes'] / kib:.1f} KiB, graph {report['graph_file_bytes'] / kib:.1f} KiB, "
        f"total {report['total_file_bytes'] / kib:.1f} KiB (+ bundle.json)",
    ])


__all__ = ["CHECKPOINT_META", "KINDS", "export_bundle", "export_checkpoint", "format_size_report", "size_report"]
