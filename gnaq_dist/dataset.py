"""Reading an ingested dataset back (the layout written by ``gnaq_dist.ingest``).

A directory is a dataset only if it has ``manifest.json`` (the commit mark written
last); with ``verify`` every file's sha256 and row count must match the manifest, so a
truncated or swapped file is caught before training on it. :func:`data_key` names the
training data, so that checkpoints and partitions of other data are refused.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import InteractionData
from gnaq_dist.storage import MANIFEST, join, resolve, sha256_of

SPLITS = ("train", "test", "valid")
REQUIRED_FILES = ("train", "test", "user_map", "item_map")  # every dataset's manifest lists these


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset's manifest; error if ``uri`` is not a committed gnaq dataset."""
    fs, path = resolve(uri, storage_options)
    mpath = join(path, MANIFEST)
    try:
        with fs.open(mpath, "rb") as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise GnaqInputError(f"{uri}: not a gnaq dataset (no {MANIFEST}; an unfinished or foreign directory)") from None
    except (NotADirectoryError, IsADirectoryError):
        raise GnaqInputError(f"{uri}: not a gnaq dataset (a file, or {MANIFEST} is not a file)") from None
    except (ValueError, UnicodeDecodeError):
        raise GnaqInputError(f"{mpath}: not valid JSON") from None
    if not isinstance(manifest, dict):
        raise GnaqInputError(f"{mpath}: a JSON {type(manifest).__name__}, not a dataset manifest (an object)")
    if manifest.get("format") != "gnaq-dataset":
        raise GnaqInputError(f"{mpath}: format {manifest.get('format')!r} is not 'gnaq-dataset'")
    if manifest.get("schema_version") != 1:
        raise GnaqInputError(f"{mpath}: schema_version {manifest.get('schema_version')!r} is not supported (expected 1)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                              for e in files.values()):
        raise GnaqInputError(f"{mpath}: 'files' is not a mapping of file entries")
    for key in ("n_users", "n_items"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise GnaqInputError(f"{mpath}: {key} must be an integer >= 0, got {value!r}")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise GnaqInputError(f"{mpath}: 'files' has no entry for {missing[0]!r} (a dataset has "
                             f"{', '.join(REQUIRED_FILES)})")
    for name, entry in files.items():
        where = entry["path"]
        if not where or where in (".", "..") or "/" in where or "\\" in where or "\0" in where:
            raise GnaqInputError(f"{mpath}: the path of {name!r}, {where!r}, is not a plain file name inside the "
                                 f"dataset directory")
        if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("rows"), int):
            raise GnaqInputError(f"{mpath}: the entry of {name!r} needs sha256 (a string) and rows (an integer)")
    return manifest


def read_tables(
    uri: str, storage_options: dict[str, Any] | None = None, verify: bool = True, names: tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """(manifest, {file name: table}) for the files listed in the manifest."""
    manifest = read_manifest(uri, storage_options)
    fs, path = resolve(uri, storage_options)
    tables: dict[str, pa.Table] = {}
    for name, entry in manifest["files"].items():
        if names is not None and name not in names:
            continue
        fpath = join(path, entry["path"])
        if not fs.exists(fpath):
            raise GnaqInputError(f"{fpath}: file listed in the manifest is missing")
        if verify:
            digest = sha256_of(fs, fpath)
            if digest != entry["sha256"]:
                raise GnaqInputError(f"{fpath}: sha256 {digest[:12]}... does not match the manifest ({entry['sha256'][:12]}...)")
        with fs.open(fpath, "rb") as handle:
            table = pq.read_table(handle)
        if verify and table.num_rows != entry["rows"]:
            raise GnaqInputError(f"{fpath}: {table.num_rows} rows, the manifest says {entry['rows']}")
        tables[name] = table
    return manifest, tables


def load_dataset(uri: str, storage_options: dict[str, Any] | None = None, verify: bool = True) -> InteractionData:
    """Dataset at ``uri`` -> :class:`InteractionData` (contiguous user/item indices)."""
    manifest, tables = read_tables(uri, storage_options, verify, names=SPLITS)

    def col(name: str, column: str) -> np.ndarray | None:
        if name not in tables:
            return None
        return tables[name].column(column).to_numpy().astype(np.int64)

    meta = {"manifest": manifest}
    for split, table in tables.items():
        for extra in ("timestamp", "weight"):
            if extra in table.column_names:
                meta[f"{split}_{extra}"] = table.column(extra).to_numpy(zero_copy_only=False)
    return InteractionData(
        n_users=int(manifest["n_users"]),
        n_items=int(manifest["n_items"]),
        train_user=col("train", "user"),
        train_item=col("train", "item"),
        test_user=col("test", "user"),
        test_item=col("test", "item"),
        valid_user=col("valid", "user"),
        valid_item=col("valid", "item"),
        fingerprint=manifest["fingerprint"],
        name=posixpath.basename(str(uri).rstrip("/")),
        meta=meta,
    )


def load_id_maps(uri: str, storage_options: dict[str, Any] | None = None, verify: bool = False) -> tuple[pa.Array, pa.Array]:
    """(user raw ids, item raw ids): element ``j`` is the raw id of contiguous index ``j``."""
    _, tables = read_tables(uri, storage_options, verify, names=("user_map", "item_map"))
    out = []
    for name in ("user_map", "item_map"):
        table = tables[name].sort_by("index")
        out.append(table.column("raw_id").combine_chunks())
    return out[0], out[1]


def data_key(data: InteractionData) -> dict[str, Any]:
    """What identifies the training data: a checkpoint or partition of other data must not load."""
    digest = hashlib.sha256()
    digest.update(np.array([data.n_users, data.n_items], dtype=np.int64).tobytes())
    for column in (data.train_user, data.train_item):  # hashed in place: no copy of the pairs
        digest.update(np.ascontiguousarray(column, dtype=np.int64).data)
    return {"fingerprint": data.fingerprint, "n_users": int(data.n_users), "n_items": int(data.n_items),
            "n_train": int(data.n_train), "train_sha256": digest.hexdigest()[:32]}
