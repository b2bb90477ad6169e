"""The ingest pipeline: read -> map ids -> clean -> split -> write, all validated first.

Nothing is written until every input row has been read and checked; the write itself
is atomic (see ``gnaq_dist.storage``).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pyarrow as pa

from gnaq_dist.config import to_dict
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.ingest.clean import dedup, drop_known_pairs, kcore
from gnaq_dist.ingest.config import IngestConfig, redacted
from gnaq_dist.ingest.edges import SPLIT_NAMES, TEST, TRAIN, TS_NULL, Edges
from gnaq_dist.ingest.idmap import IdMap, compact
from gnaq_dist.ingest.lightgcn_text import read_lightgcn
from gnaq_dist.ingest.reader import open_source, read_parquet
from gnaq_dist.ingest.split import assign_split, valid_from_train
from gnaq_dist.ingest.writer import write_dataset
from gnaq_dist.overwrite import check_disjoint, check_replaceable
from gnaq_dist.storage import output_exists, resolve


def _existing(out: str, opts: dict[str, Any]) -> tuple[dict[str, Any], Edges, np.ndarray, IdMap, IdMap]:
    """An existing dataset as (manifest, edges, labels, user map, item map), verified."""
    from gnaq_dist.concurrency import ConcurrentWriteError
    from gnaq_dist.dataset import read_manifest, read_tables

    version = read_manifest(out, opts).get("version")
    try:
        manifest, tables = read_tables(out, opts, verify=True)
    except (GnaqInputError, OSError):  # a file missing, changed, or gone between exists() and open()
        if read_manifest(out, opts).get("version") == version:
            raise  # no commit meanwhile: the dataset's files are missing or damaged
        # Another writer committed while this one read, and removed the files it was reading.
        raise ConcurrentWriteError(f"{out}: another writer committed it while this one read it; "
                                   f"nothing was written, run again") from None
    maps = []
    for name in ("user_map", "item_map"):
        table = tables[name].sort_by("index")
        raw = table.column("raw_id")
        kind = "int" if pa.types.is_integer(raw.type) else "string"
        maps.append(IdMap(kind, raw.to_pylist()))
    parts, labels = [], []
    for code, name in SPLIT_NAMES.items():
        if name not in tables:
            continue
        t = tables[name]
        ts = None
        if "timestamp" in t.column_names:
            ts = t.column("timestamp").fill_null(TS_NULL).to_numpy().astype(np.int64)
        w = t.column("weight").to_numpy().astype(np.float32) if "weight" in t.column_names else None
        parts.append(Edges(t.column("user").to_numpy().astype(np.int32), t.column("item").to_numpy().astype(np.int32), ts, w))
        labels.append(np.full(t.num_rows, code, dtype=np.int8))
    return manifest, Edges.concat(parts), np.concatenate(labels), maps[0], maps[1]


def _fingerprint(files: list[tuple[str, int, str]]) -> str:
    digest = hashlib.sha256()
    for path, size, stamp in sorted(files):
        digest.update(f"{path}\0{size}\0{stamp}\n".encode())
    return digest.hexdigest()


def ingest(source: str, out: str, config: IngestConfig, *, overwrite: bool = False, append: bool = False) -> dict[str, Any]:
    """Ingest ``source`` into the dataset directory ``out``; returns the manifest."""
    t0 = time.perf_counter()
    opts = config.storage_options
    if overwrite and append:
        raise GnaqInputError(f"{out}: choose --append or --overwrite, not both")
    check_disjoint(out, source, opts, out_name="OUT", in_name="SOURCE")
    if overwrite:
        check_replaceable(out, opts, "dataset")
    out_fs, out_path = resolve(out, opts)
    if not append and not overwrite and output_exists(out_fs, out_path):
        raise GnaqInputError(f"{out}: output already exists (use --overwrite, or --append to add to it)")

    old = None
    users, items = IdMap(), IdMap()
    if append:
        if config.format == "lightgcn":
            raise GnaqInputError(f"{source}: --append takes Parquet logs, not a LightGCN folder")
        old = _existing(out, opts)
        users, items = old[3], old[4]
        if old[0]["has_weight"] != bool(config.columns.weight):
            raise GnaqInputError(
                f"{out}: the dataset {'has' if old[0]['has_weight'] else 'has no'} weight column; "
                f"columns.weight must {'be set' if old[0]['has_weight'] else 'be null'} to append to it"
            )
    n_old_users, n_old_items = len(users), len(items)

    filtered = 0
    if config.format == "lightgcn":
        edges, users, items, files, rows_read = read_lightgcn(source, opts)
        n_files, fingerprint, has_ts = len(files), _fingerprint(files), False
    else:
        src = open_source(source, opts)
        if src.total_rows == 0:
            raise GnaqInputError(f"{source}: empty dataset (no rows in {len(src.files)} file(s))")
        edges, stats = read_parquet(src, config, users, items)
        rows_read, filtered, has_ts = stats.rows_read, stats.filtered_by_event, stats.has_timestamp
        n_files, fingerprint = len(src.files), src.fingerprint()
        if len(edges) == 0:
            raise GnaqInputError(
                f"{source}: empty dataset (no rows left after filtering column {config.columns.event!r} "
                f"by keep_events {config.keep_events})"
            )

    known = 0
    if old is not None:
        edges, known = drop_known_pairs(edges, old[1].user, old[1].item)
    duplicates = 0
    if config.dedup:
        edges, duplicates = dedup(edges)
    dropped_k = 0
    if old is None:
        edges, dropped_k = kcore(edges, len(users), len(items), config.kcore_users, config.kcore_items)
        if len(edges) == 0:
            raise GnaqInputError(
                f"{source}: empty dataset (k-core {config.kcore_users}/{config.kcore_items} removed every row)"
            )

    by = "index" if config.format == "lightgcn" else "appearance"
    if config.format == "lightgcn" and dropped_k == 0:
        user_order = item_order = None  # keep listed users without items: ids = benchmark ids
    else:
        new_user, user_order = compact(edges.user, len(users), n_old_users, by)
        new_item, item_order = compact(edges.item, len(items), n_old_items, by)
        edges.user, edges.item = new_user.astype(np.int32), new_item.astype(np.int32)
    user_raw, item_raw = users.raw_array(user_order), items.raw_array(item_order)

    if config.format == "lightgcn":
        label = edges.label
        if not (label == TEST).any():
            raise GnaqInputError(f"{source}: test.txt leaves no test data")
        if not (label == TRAIN).any():
            raise GnaqInputError(f"{source}: train.txt leaves no training data")
    else:
        label = assign_split(edges, len(user_raw), config.split, source, require_test=old is None,
                             require_train=old is None)
    if config.split.valid_fraction > 0 and (config.format == "lightgcn" or config.split.strategy == "column"):
        label = valid_from_train(edges, label, len(user_raw), config.split, source)

    rows_kept = len(edges)
    version, mode, history = 1, ("overwrite" if overwrite else "create"), []
    if old is not None:
        manifest_old = old[0]
        version, mode = int(manifest_old["version"]) + 1, "replace"
        history = list(manifest_old.get("history", [])) + [
            {"version": manifest_old["version"], "created_at": manifest_old["created_at"], "source": manifest_old["source"]}
        ]
        has_ts = has_ts or bool(manifest_old["has_timestamp"])
        if has_ts and edges.timestamp is None:
            edges.timestamp = np.full(len(edges), TS_NULL, np.int64)
        old_edges = old[1]
        if has_ts and old_edges.timestamp is None:
            old_edges.timestamp = np.full(len(old_edges), TS_NULL, np.int64)
        edges = Edges.concat([old_edges, edges])
        label = np.concatenate([old[2], label])
    seconds = time.perf_counter() - t0
    info = {
        "source": {
            "uri": source,
            "format": config.format,
            "fingerprint": fingerprint,
            "n_files": n_files,
            "rows_read": int(rows_read),
            "rows_kept": int(rows_kept),
            "duplicates_dropped": int(duplicates),
            "filtered_by_event": int(filtered),
            "dropped_by_kcore": int(dropped_k),
            "known_pairs_dropped": int(known),
            "new_users": len(user_raw) - n_old_users,
            "new_items": len(item_raw) - n_old_items,
            "seconds_before_write": round(seconds, 3),
        },
        "ingest": redacted(to_dict(config)),
        "history": history,
    }
    manifest = write_dataset(
        out, opts, edges, label, user_raw, item_raw,
        has_timestamp=has_ts, has_weight=bool(config.columns.weight), info=info, version=version, mode=mode,
        # an append commits only onto the version it read: a concurrent append makes this one fail
        expect={"version": old[0]["version"], "fingerprint": old[0]["fingerprint"]} if old is not None else None,
    )
    return manifest
