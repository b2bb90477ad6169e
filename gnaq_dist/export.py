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

The layout's names are :mod:`gnaq_dist.bundle`'s; the directory is committed by
:class:`gnaq_dist.storage.AtomicOutput`. Tables come in as numpy arrays, so importing
this module pulls in neither torch nor Ray nor DGL; reading a checkpoint (torch, and DGL
for BiGeaR) is :func:`gnaq_dist.checkpoint.load_for_export`, imported by
:func:`export_checkpoint` when called.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from gnaq_dist.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_JSON,
    BUNDLE_VERSION,
    KINDS,
    SUPPORTED_BITS,
    TABLE_FIELDS,
    body_digest,
    file_name,
    packed_row_bytes,
)
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import InteractionData, unique_pair_keys
from gnaq_dist.overwrite import check_disjoint, check_replaceable
from gnaq_dist.storage import AtomicOutput, output_exists, resolve

#: Columns of near-random bytes (codes, levels, floats): dictionaries and statistics only add size.
PLAIN_COLUMNS = ("codes", "levels", "embedding")


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
    """An fp table as a float32 (N, d) numpy array (a torch tensor is detached and converted)."""
    if hasattr(table, "detach"):
        table = table.detach().cpu().numpy()
    x = np.asarray(table)
    if x.ndim != 2 or x.shape[0] != n or x.shape[1] < 1:
        raise GnaqInputError(f"fp table must be ({n}, d), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise GnaqInputError("fp table has non-finite values")
    return x.astype(np.float32, copy=False)


def _packed_arrays(table: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, levels) of a packed table: a :class:`~gnaq_dist.quant.packing.PackedTable` or any
    object with its fields (numpy ``codes``/``levels``, ``bits``, ``dim``, ``groups``, ...)."""
    missing = [f for f in ("codes", "levels", "method", "bits", "dim", "groups", "needs_propagation",
                           "group_weights") if not hasattr(table, f)]
    if missing:
        raise GnaqInputError(f"kind 'packed' needs a PackedTable, got {type(table).__name__} "
                             f"(no {', '.join(missing)})")
    codes, levels = np.asarray(table.codes), np.asarray(table.levels)
    if table.bits not in SUPPORTED_BITS:
        raise GnaqInputError(f"packed table: bits must be one of {SUPPORTED_BITS}, got {table.bits!r}")
    if codes.shape[0] != n:
        raise GnaqInputError(f"packed table has {codes.shape[0]} rows, the data {n} nodes")
    width = packed_row_bytes(table.groups * table.dim, table.bits)
    if codes.dtype != np.uint8 or codes.shape != (n, width):
        raise GnaqInputError(f"packed codes must be uint8 ({n}, {width}), got {codes.dtype} {codes.shape}")
    if levels.ndim != 3 or levels.shape[0] not in (1, n) or levels.shape[1:] != (table.groups, 1 << table.bits):
        raise GnaqInputError(f"packed levels must be ({n} or 1, {table.groups}, {1 << table.bits}), "
                             f"got {levels.shape}")
    if levels.dtype not in (np.float16, np.float32):
        raise GnaqInputError(f"packed levels must be float16 or float32, got {levels.dtype}")
    if not np.all(np.isfinite(levels)):
        raise GnaqInputError("packed table has non-finite levels")
    return codes, levels


# -- the bundle ------------------------------------------------------------------------------
def _embedding_tables(kind: str, table: Any, n: int) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """The embedding files and the bundle.json fields that describe them (plus byte counts)."""
    if kind == "fp":
        x = _as_float32_table(table, n)
        return ({"embeddings": pa.table({"embedding": _fixed_list(x)})},
                {"method": "fp", "bits": None, "dim": int(x.shape[1]), "groups": 1, "needs_propagation": True,
                 "group_weights": None, "level_dtype": None, "levels_shared": False,
                 "embedding_bytes": int(x.shape[0] * x.shape[1] * 4), "code_bytes": 0, "level_bytes": 0})
    codes, levels = _packed_arrays(table, n)
    weights = table.group_weights
    return ({"codes": pa.table({"codes": _fixed_binary(codes)}),
             "levels": pa.table({"levels": _fixed_list(levels.reshape(levels.shape[0], -1))})},
            {"method": table.method, "bits": int(table.bits), "dim": int(table.dim), "groups": int(table.groups),
             "needs_propagation": bool(table.needs_propagation),
             "group_weights": None if weights is None else [float(w) for w in weights],
             "level_dtype": np.dtype(levels.dtype).name, "levels_shared": levels.shape[0] == 1,
             "embedding_bytes": int(codes.nbytes + levels.nbytes), "code_bytes": int(codes.nbytes),
             "level_bytes": int(levels.nbytes)})


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

    ``kind`` is "packed" (``table`` a PackedTable: numpy codes and levels) or "fp" (a
    float32 (N, d) array). ``id_maps`` = (user raw ids, item raw ids) as :func:`gnaq_dist.dataset.load_id_maps`
    returns them; without it the raw ids are the internal indices. Refuses an existing
    ``out_uri`` unless ``overwrite``; on any error nothing is left behind.
    """
    if kind not in KINDS:
        raise GnaqInputError(f"kind must be one of {KINDS}, got {kind!r}")
    if overwrite:
        check_replaceable(out_uri, storage_options, "bundle")
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
    with AtomicOutput(out_uri, storage_options, "overwrite" if overwrite else "create", mark=BUNDLE_JSON,
                      exists_error="{uri}: already exists; pass --overwrite (overwrite=True) to replace it",
                      file_error="{uri}: exists and is a file, not a bundle directory") as out:
        files = {}
        for name, t in tables.items():
            dictionary = [c for c in t.column_names if c not in PLAIN_COLUMNS]
            files[name] = out.write_parquet(file_name(name), t, use_dictionary=dictionary,
                                            write_statistics=dictionary)
        report = size_report(fields, files, n)
        info: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "kind": kind,
            **{k: fields[k] for k in TABLE_FIELDS},
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

    # before the checkpoint is read: an OUT that would replace or sit in it, or replace
    # something that is not a bundle, changes nothing
    check_disjoint(out_uri, checkpoint_uri, storage_options, out_name="OUT", in_name="CHECKPOINT")
    if overwrite:
        check_replaceable(out_uri, storage_options, "bundle")
    elif output_exists(*resolve(out_uri, storage_options)):
        raise GnaqInputError(f"{out_uri}: already exists; pass --overwrite (overwrite=True) to replace it")
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
