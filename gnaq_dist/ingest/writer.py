"""Dataset layout writer: split tables, id maps and the manifest, committed atomically."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from gnaq_dist.ingest.edges import SPLIT_NAMES, TS_NULL, VALID, Edges
from gnaq_dist.storage import AtomicOutput

FORMAT = "gnaq-dataset"
SCHEMA_VERSION = 1


def _split_table(edges: Edges, has_timestamp: bool, has_weight: bool) -> pa.Table:
    """Columns user int32, item int32, [timestamp int64 nullable], [weight float32]."""
    cols: dict[str, pa.Array] = {
        "user": pa.array(edges.user.astype(np.int32, copy=False)),
        "item": pa.array(edges.item.astype(np.int32, copy=False)),
    }
    if has_timestamp:
        ts = edges.timestamp if edges.timestamp is not None else np.full(len(edges), TS_NULL, np.int64)
        cols["timestamp"] = pa.array(ts, type=pa.int64(), mask=ts == TS_NULL)
    if has_weight:
        w = edges.weight if edges.weight is not None else np.ones(len(edges), np.float32)
        cols["weight"] = pa.array(w.astype(np.float32, copy=False))
    return pa.table(cols)


def dataset_fingerprint(files: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}:{files[name]['sha256']}\n".encode())
    return digest.hexdigest()


def file_name(name: str, version: int) -> str:
    return f"{name}.parquet" if version == 1 else f"{name}.v{version}.parquet"


def write_dataset(
    out: str,
    storage_options: dict[str, Any] | None,
    edges: Edges,
    label: np.ndarray,
    user_raw: pa.Array,
    item_raw: pa.Array,
    *,
    has_timestamp: bool,
    has_weight: bool,
    info: dict[str, Any],
    version: int = 1,
    mode: str = "create",
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every file, then the manifest; returns the manifest. ``expect``: what the
    manifest at ``out`` must still hold at the commit (an append's version and fingerprint),
    else :class:`~gnaq_dist.concurrency.ConcurrentWriteError` and nothing written."""
    from gnaq_dist.ingest.idmap import IdMap

    with AtomicOutput(out, storage_options, mode=mode, expect=expect) as target:
        files: dict[str, dict[str, Any]] = {}
        counts: dict[str, int] = {}
        for code, name in SPLIT_NAMES.items():
            rows = np.flatnonzero(label == code)
            if code == VALID and len(rows) == 0:
                continue
            files[name] = target.write_parquet(file_name(name, version), _split_table(edges.take(rows), has_timestamp, has_weight))
            counts[name] = int(len(rows))
        files["user_map"] = target.write_parquet(file_name("user_map", version), IdMap.to_table(user_raw))
        files["item_map"] = target.write_parquet(file_name("item_map", version), IdMap.to_table(item_raw))
        n_users, n_items = len(user_raw), len(item_raw)
        total = int(len(edges))
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "version": version,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "n_users": n_users,
            "n_items": n_items,
            "n_interactions": total,
            "counts": counts,
            "density": total / (n_users * n_items) if n_users and n_items else 0.0,
            "has_timestamp": has_timestamp,
            "has_weight": has_weight,
            **info,
            "files": files,
            "fingerprint": dataset_fingerprint(files),
        }
        target.commit(manifest)
    return manifest
