"""Sharded checkpoints: the on-disk format, its verification, retention and loading.

Layout (PyTorch-BigGraph style: one file per shard, a manifest as the commit mark)::

    ROOT/ckpt-000000001234/            global step, zero-padded: names sort by step
        shard-00000-of-00002.parquet   rank 0's rows: global_id, parameters, packed codes,
                                       row-sparse Adam moments and step counts
        residuals-00000-of-00002.parquet  rank 0's error-feedback residuals (message, global_id)
        dense.parquet                  replicated parameters and their Adam state (rank 0)
        partition.parquet              the owner rank of every node (rank 0)
        manifest.json                  written LAST: world size, method, bits, dim, step,
                                       config, dataset key, partition, sha256 of every file

Why this shape: every rank writes only what it owns, in parallel, through fsspec (local,
``memory://``, ``s3://``), each file all or nothing (:func:`gnaq_dist.storage.write_file`);
nothing is pickled, and every file is readable with pyarrow
alone. A directory without ``manifest.json``, or with a file whose size or sha256
differs from it, is never loaded: :meth:`CheckpointStore.latest` skips it (with a
warning naming the file) and falls back to the newest complete checkpoint.

This module knows the format and the methods' parameters; the collective parts (who
writes what, when) live in :mod:`gnaq_dist.distributed.checkpointing`.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gnaq_dist.dataset import data_key, load_dataset  # data_key re-exported: the trainers check checkpoints with it
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import InteractionData
from gnaq_dist.quant import METHODS, build_method
from gnaq_dist.quant.base import EmbeddingMethod
from gnaq_dist.storage import join, resolve, write_file

log = logging.getLogger(__name__)

FORMAT = "gnaq-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"^ckpt-(\d{12})$")


class CheckpointError(GnaqInputError):
    """A checkpoint that must not be loaded (missing manifest, bad checksum, wrong dataset)."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{int(step):012d}"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.parquet"


def residual_name(rank: int, world: int) -> str:
    return f"residuals-{rank:05d}-of-{world:05d}.parquet"


# -- files ---------------------------------------------------------------------------------
def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# -- tables of a method's state ----------------------------------------------------------------
def _column(values: np.ndarray) -> pa.Array:
    """(n, w) float array -> fixed-size list column; 1-D -> plain column."""
    if values.ndim == 1:
        return pa.array(values)
    flat = np.ascontiguousarray(values.reshape(values.shape[0], -1))
    width = flat.shape[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def _array(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        values = column.flatten().to_numpy(zero_copy_only=False)
    else:
        values = column.to_numpy(zero_copy_only=False)
    return np.array(values, dtype=dtype).reshape(shape)  # a writable copy (torch wraps it)


def _row_names(method: EmbeddingMethod) -> tuple[list[str], list[str]]:
    """Names of the method's row parameters (in ``trainable_row_params`` order) and row buffers."""
    names = {id(p): n for n, p in method.named_parameters()}
    buffers = {id(b): n for n, b in method.named_buffers()}
    return [names[id(p)] for p in method.trainable_row_params()], [buffers[id(b)] for b in method.row_buffers()]


def _dense_names(method: EmbeddingMethod) -> list[str]:
    names = {id(p): n for n, p in method.named_parameters()}
    return [names[id(p)] for p in method.dense_params()]


def shard_table(method: EmbeddingMethod, global_ids: np.ndarray, optimizer=None) -> pa.Table:
    """One row per owned node: ``global_id``, ``param.*``, ``buffer.codes`` (packed) and ``adam.*``.

    A rank that owns no node holds a one-row placeholder method; it writes zero rows.
    """
    n = int(global_ids.shape[0])
    cols: dict[str, pa.Array] = {"global_id": pa.array(np.asarray(global_ids, dtype=np.int64))}
    params, buffers = _row_names(method)
    for name, p in zip(params, method.trainable_row_params()):
        cols[f"param.{name}"] = _column(p.detach()[:n].to(torch.float32).numpy())
    for name, b in zip(buffers, method.row_buffers()):
        if name == "packed_codes":  # already the storage layout: one fixed-size binary per row
            packed = b[:n].numpy()
            width = packed.shape[1]
            cols["buffer.codes"] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(packed).tobytes())])
        elif b.dtype == torch.uint8:  # bytes as held (gnaq_lat's packed latent): one byte a value on disk
            cols[f"buffer.{name}"] = _column(b[:n].numpy())
        else:
            cols[f"buffer.{name}"] = _column(b[:n].to(torch.float32).numpy())
    if optimizer is not None:
        for name, m, v in zip(params, optimizer.exp_avg, optimizer.exp_avg_sq):
            cols[f"adam.m.{name}"] = _column(m[:n].numpy())
            cols[f"adam.v.{name}"] = _column(v[:n].numpy())
        cols["adam.steps"] = pa.array(optimizer.steps[:n].numpy())
    return pa.table(cols)


def dense_table(method: EmbeddingMethod, optimizer: torch.optim.Optimizer | None) -> pa.Table:
    """Replicated parameters (LSQ's step, N2UQ's intervals) and their Adam state, by name."""
    names, kinds, shapes, values = [], [], [], []
    state = optimizer.state_dict()["state"] if optimizer is not None else {}
    for i, (name, p) in enumerate(zip(_dense_names(method), method.dense_params())):
        entries = [("value", p.detach())]
        if i in state:
            entries += [(f"adam.{k}", torch.as_tensor(state[i][k])) for k in ("step", "exp_avg", "exp_avg_sq")]
        for kind, t in entries:
            names.append(name)
            kinds.append(kind)
            shapes.append(list(t.shape))
            values.append(t.detach().reshape(-1).to(torch.float64).tolist())
    return pa.table({"name": pa.array(names, pa.string()), "kind": pa.array(kinds, pa.string()),
                     "shape": pa.array(shapes, pa.list_(pa.int64())), "values": pa.array(values, pa.list_(pa.float64()))})


def residual_table(residuals: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    """Error-feedback residuals of every gradient message: (message, global_id, residual)."""
    tables = [pa.table({"message": pa.array([], pa.int16()), "global_id": pa.array([], pa.int64()),
                        "residual": pa.array([], pa.list_(pa.float32()))})]
    for i, (gid, res) in enumerate(residuals):
        n = int(gid.shape[0])
        res = np.ascontiguousarray(res, dtype=np.float32)
        if res.ndim != 2 or res.shape[0] != n:
            raise GnaqInputError(f"residuals of message {i} must be ({n}, width), got {res.shape}")
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * res.shape[1])
        tables.append(pa.table({"message": pa.array(np.full(n, i, dtype=np.int16)),
                                "global_id": pa.array(np.asarray(gid, dtype=np.int64)),
                                "residual": pa.ListArray.from_arrays(offsets, pa.array(res.reshape(-1)))}))
    return pa.concat_tables(tables)


def _check_row_columns(method: EmbeddingMethod, columns: list[str], with_optimizer: bool) -> None:
    """A one-line :class:`CheckpointError` unless ``columns`` hold every row column ``method`` stores."""
    params, buffers = _row_names(method)
    needed = [f"param.{name}" for name in params]
    needed += ["buffer.codes" if name == "packed_codes" else f"buffer.{name}" for name in buffers]
    if with_optimizer:
        needed += [f"adam.{m}.{name}" for name in params for m in ("m", "v")] + ["adam.steps"]
    missing = [name for name in needed if name not in columns]
    if missing:
        raise CheckpointError(f"the shard rows have no column {missing[0]!r}, which method {method.name!r} stores "
                              f"(its manifest's shard_method does not match its shard files)")


def check_shard_columns(uri: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Every shard of a checkpoint holds the row columns its ``shard_method`` stores, optimizer state
    included (what a resume loads); read from the Parquet footers only, so that a driver can refuse
    before any worker starts."""
    method = build_for_rows(manifest, 1)
    fs, path = resolve(uri, storage_options)
    for rank in range(manifest["world_size"]):
        name = shard_name(rank, manifest["world_size"])
        with fs.open(join(path, name), "rb") as handle:
            columns = pq.read_schema(handle).names
        try:
            _check_row_columns(method, columns, with_optimizer=True)
        except CheckpointError as exc:
            raise CheckpointError(f"{uri}/{name}: {exc}") from None


def load_rows(method: EmbeddingMethod, rows: pa.Table, optimizer=None) -> None:
    """Set ``method``'s row parameters, buffers (and ``optimizer``'s row state) from ``rows``.

    Rows without a column the method stores (a manifest whose ``shard_method`` is not the one
    that wrote the shards) are a one-line :class:`CheckpointError`, not a ``KeyError``.
    """
    n = rows.num_rows
    _check_row_columns(method, rows.column_names, optimizer is not None)
    params, buffers = _row_names(method)
    with torch.no_grad():
        for name, p in zip(params, method.trainable_row_params()):
            width = int(np.prod(p.shape[1:])) if p.dim() > 1 else 1
            p[:n] = torch.from_numpy(_array(rows[f"param.{name}"], (n, width))).reshape((n,) + tuple(p.shape[1:]))
        for name, b in zip(buffers, method.row_buffers()):
            if name == "packed_codes":
                col = rows["buffer.codes"].combine_chunks()
                if col.type.byte_width != b.shape[1]:
                    raise GnaqInputError(f"buffer.codes holds {col.type.byte_width} bytes a row, "
                                         f"the model packs {b.shape[1]}")
                raw = np.frombuffer(col.buffers()[1], dtype=np.uint8,
                                    count=n * col.type.byte_width, offset=col.offset * col.type.byte_width)
                b[:n] = torch.from_numpy(raw.reshape(n, col.type.byte_width).copy())
            else:
                dtype = np.uint8 if b.dtype == torch.uint8 else np.float32  # older checkpoints: float32 columns
                b[:n] = torch.from_numpy(_array(rows[f"buffer.{name}"], (n, b.shape[1]), dtype)).to(b.dtype)
    if optimizer is not None:
        for name, m, v in zip(params, optimizer.exp_avg, optimizer.exp_avg_sq):
            width = int(np.prod(m.shape[1:])) if m.dim() > 1 else 1
            m[:n] = torch.from_numpy(_array(rows[f"adam.m.{name}"], (n, width))).reshape((n,) + tuple(m.shape[1:]))
            v[:n] = torch.from_numpy(_array(rows[f"adam.v.{name}"], (n, width))).reshape((n,) + tuple(v.shape[1:]))
        optimizer.steps[:n] = torch.from_numpy(_array(rows["adam.steps"], (n,), np.int64))


def load_dense(method: EmbeddingMethod, table: pa.Table, optimizer: torch.optim.Optimizer | None) -> None:
    """Inverse of :func:`dense_table` (a method without dense parameters ignores it)."""
    entries = {(n, k): (s, v) for n, k, s, v in zip(*(table[c].to_pylist() for c in ("name", "kind", "shape", "values")))}
    state: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(zip(_dense_names(method), method.dense_params())):
            if (name, "value") not in entries:
                raise CheckpointError(f"dense.parquet has no value for parameter {name!r}")
            shape, values = entries[(name, "value")]
            p.copy_(torch.tensor(values, dtype=p.dtype).reshape(shape))
            if (name, "adam.step") in entries:
                state[i] = {k: torch.tensor(entries[(name, f"adam.{k}")][1], dtype=torch.float32)
                            .reshape(entries[(name, f"adam.{k}")][0]) for k in ("step", "exp_avg", "exp_avg_sq")}
    if optimizer is not None and state:
        sd = optimizer.state_dict()
        sd["state"] = state
        optimizer.load_state_dict(sd)


# -- the store -------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A verified checkpoint: where it is and its manifest."""

    uri: str
    manifest: dict[str, Any]


class CheckpointStore:
    """The checkpoints under one root URI: list, verify, find the newest complete, prune."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.path = resolve(self.root, self.storage_options)

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def dir_path(self, name: str) -> str:
        return join(self.path, name)

    def names(self) -> list[str]:
        """Checkpoint directory names, oldest first (complete or not)."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in (posixpath.basename(e.rstrip("/")) for e in entries) if _NAME.match(n))

    def write_file(self, name: str, file: str, data: bytes) -> dict[str, Any]:
        return write_file(self.fs, join(self.dir_path(name), file), data)

    def commit(self, name: str, manifest: dict[str, Any]) -> str:
        """Write the manifest (the commit mark) of checkpoint ``name``; returns its URI."""
        write_file(self.fs, join(self.dir_path(name), MANIFEST), json.dumps(manifest, indent=1).encode())
        return self.uri(name)

    def latest(self, data: dict[str, Any] | None = None) -> Loaded | None:
        """The newest checkpoint that verifies (and matches ``data``); incomplete ones are skipped."""
        for name in reversed(self.names()):
            try:
                return Loaded(self.uri(name), verify(self.uri(name), self.storage_options, data))
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", self.uri(name), exc)
        return None

    def prune(self, keep: int) -> list[str]:
        """Keep the newest ``keep`` complete checkpoints; remove older ones and older debris."""
        if keep < 1:
            return []
        names = self.names()
        complete = [n for n in names if self.fs.exists(join(self.dir_path(n), MANIFEST))]
        if len(complete) <= keep:
            cutoff = complete[0] if complete else None
            doomed = [n for n in names if cutoff is not None and n < cutoff and n not in complete]
        else:
            cutoff = complete[-keep]
            doomed = [n for n in names if n < cutoff]
        for n in doomed:
            try:
                self.fs.rm(self.dir_path(n), recursive=True)
            except (FileNotFoundError, OSError) as exc:
                log.warning("could not remove old checkpoint %s: %s", self.uri(n), exc)
        return doomed


def choose_resume(resume: str, every_epochs: int, root: str, storage_options: dict[str, Any] | None,
                  data: dict[str, Any], model: dict[str, Any], hint: str | None = None) -> Loaded | None:
    """The checkpoint a run starts from (``checkpoint.resume``), verified against ``data`` and ``model``.

    ``never``: none. A URI: that checkpoint. ``auto``: with ``every_epochs`` > 0, the newest of
    ``hint`` (the checkpoint Ray Train handed back to a restarted run) and the newest complete
    one under ``root``; with ``every_epochs`` 0, none. A checkpoint of other data or another
    model is an error, not a skip.
    """
    if resume == "never":
        return None
    if resume != "auto":
        return Loaded(resume, verify(resume, storage_options, data, model))
    if not every_epochs:
        return None
    # Ray Train's hint is the last checkpoint it registered; a worker killed between our commit
    # and that registration leaves a newer complete one under the root: take the newest.
    candidates = []
    if hint:
        try:
            candidates.append(Loaded(hint, verify(hint, storage_options)))
        except CheckpointError as exc:
            log.warning("the checkpoint Ray Train handed back cannot be loaded (%s); looking for the "
                        "newest complete one under %s", exc, root)
    newest = CheckpointStore(root, storage_options).latest()
    if newest is not None:
        candidates.append(newest)
    loaded = max(candidates, key=lambda c: c.manifest["step"], default=None)
    if loaded is not None:
        verify(loaded.uri, storage_options, data, model)
    return loaded


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RANK_FILE = re.compile(r"^(shard|residuals)-(\d{5})-of-(\d{5})\.parquet$")
#: The files a checkpoint holds besides its ranks' shards and residuals.
REPLICATED_FILES = ("dense.parquet", "partition.parquet")


def _plain_name(name: Any) -> bool:
    """A file name that stays inside its directory: no separator, no ``..``, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not name.startswith("~")
            and not any(c in name for c in "/\\\0:"))


def _int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_manifest(uri: str, manifest: Any) -> dict[str, Any]:
    """``manifest`` if it has a checkpoint manifest's shape, else a one-line :class:`CheckpointError`.

    Every listed name is a plain file name inside the checkpoint directory; a rank's file
    (``shard-R-of-W``, ``residuals-R-of-W``) belongs to this ``world_size`` and every rank's
    shard is listed; the only other files are :data:`REPLICATED_FILES`; each entry has its
    size and sha256. Readers then open only listed names (:func:`read_table`).
    """
    where = f"{uri}/{MANIFEST}"
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: a JSON {type(manifest).__name__}, not a checkpoint manifest (an object)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{where}: not a {FORMAT} v{VERSION} manifest (format {manifest.get('format')!r}, "
                              f"version {manifest.get('version')!r})")
    world = manifest.get("world_size")
    if not _int(world, 1):
        raise CheckpointError(f"{where}: world_size must be an integer >= 1, got {world!r}")
    for key in ("step", "epoch"):
        if not _int(manifest.get(key), 0):
            raise CheckpointError(f"{where}: {key} must be an integer >= 0, got {manifest.get(key)!r}")
    if manifest.get("shard_method") not in METHODS:
        raise CheckpointError(f"{where}: shard_method must name a method ({', '.join(METHODS)}), "
                              f"got {manifest.get('shard_method')!r}")
    for key in ("model", "data", "partition", "config", "progress"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{where}: {key} must be an object, got {type(manifest.get(key)).__name__}")
    model = manifest["model"]
    if not _int(model.get("dim"), 1) or not _int(model.get("num_layers"), 0):
        raise CheckpointError(f"{where}: model.dim and model.num_layers must be integers "
                              f"(got {model.get('dim')!r}, {model.get('num_layers')!r})")
    for key, allowed in (("level_dtype", ("float16", "float32")), ("phi", ("tanh", "identity", None)),
                         ("lsq_step", ("tensor", "node"))):
        if key in model and model[key] not in allowed:
            raise CheckpointError(f"{where}: model.{key} {model[key]!r} is not one of "
                                  f"{', '.join(repr(a) for a in allowed)}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: files must be an object naming the checkpoint's files, "
                              f"got {type(files).__name__ if files is not None else 'nothing'}")
    for name, entry in files.items():
        if not _plain_name(name):
            raise CheckpointError(f"{where}: file name {name!r} is not a plain file name inside the checkpoint "
                                  f"directory")
        if not isinstance(entry, dict) or not _int(entry.get("bytes"), 0) \
                or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise CheckpointError(f"{where}: the entry of {name} needs bytes (an integer) and sha256 (64 hex digits)")
        ranked = _RANK_FILE.match(name)
        if ranked is not None:
            if int(ranked[3]) != world or int(ranked[2]) >= world:
                raise CheckpointError(f"{where}: lists {name}, a file of another world size than its "
                                      f"world_size {world}")
        elif name not in REPLICATED_FILES:
            raise CheckpointError(f"{where}: lists {name!r}, which is no file of a checkpoint")
    missing = [shard_name(r, world) for r in range(world) if shard_name(r, world) not in files]
    if missing:
        raise CheckpointError(f"{where}: world_size {world} but {missing[0]} is not listed "
                              f"({len(missing)} of {world} shards missing)")
    return manifest


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of checkpoint ``uri``, its shape checked (:func:`check_manifest`); files not read."""
    fs, path = resolve(uri, storage_options)
    mpath = join(path, MANIFEST)
    try:
        with fs.open(mpath, "rb") as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no {MANIFEST} (an unfinished checkpoint, or not a checkpoint)") from None
    except (NotADirectoryError, IsADirectoryError):
        raise CheckpointError(f"{uri}: not a checkpoint directory (a file, or {MANIFEST} is not a file)") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{uri}/{MANIFEST}: not valid JSON") from None
    return check_manifest(uri, manifest)


def verify(uri: str, storage_options: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
           model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``uri`` if every file it lists is there with its size and sha256.

    ``data`` (a :func:`data_key`) and ``model`` (``method``/``bits``/``dim``) must match
    when given: a checkpoint of other data or another table format is refused.
    """
    manifest = read_manifest(uri, storage_options)
    fs, path = resolve(uri, storage_options)
    for name, entry in manifest["files"].items():
        fpath = join(path, name)
        try:
            size = fs.size(fpath)
        except FileNotFoundError:
            raise CheckpointError(f"{uri}/{name}: listed in the manifest but missing") from None
        if size != entry["bytes"]:
            raise CheckpointError(f"{uri}/{name}: {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        with fs.open(fpath, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        if digest != entry["sha256"]:
            raise CheckpointError(f"{uri}/{name}: sha256 does not match the manifest (corrupted)")
    if data is not None:
        check_data(uri, manifest, data)
    if model is not None:
        check_model(uri, manifest, model)
    return manifest


def check_data(uri: str, manifest: dict[str, Any], data: dict[str, Any]) -> None:
    """Refuse a checkpoint written for other training data than ``data`` (a :func:`data_key`)."""
    mine = manifest["data"]
    for key in ("n_users", "n_items", "n_train", "train_sha256"):
        if mine.get(key) != data.get(key):
            raise CheckpointError(
                f"{uri}: written for another dataset ({key} {mine.get(key)!r}, this run's data has "
                f"{data.get(key)!r})")


def check_model(uri: str, manifest: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse a checkpoint of another table format (``method``, ``bits``, ``dim``, ``num_layers``,
    ``lsq_step``)."""
    have = {"lsq_step": "tensor", **manifest["model"]}  # manifests older than lsq_step were written with one step
    for key in ("method", "bits", "dim", "num_layers", "lsq_step"):
        if key in model and have.get(key) != model[key]:
            raise CheckpointError(f"{uri}: model.{key} is {have.get(key)!r} in the checkpoint, "
                                  f"{model[key]!r} in this config")


def read_table(uri: str, name: str, storage_options: dict[str, Any] | None = None,
               filter_ids: np.ndarray | None = None, *, manifest: dict[str, Any]) -> pa.Table:
    """One Parquet file of a checkpoint, opened only if ``manifest`` lists it and checked against
    its entry (size and sha256) as it is read; optionally only rows whose global_id is listed."""
    entry = manifest["files"].get(name) if isinstance(manifest.get("files"), dict) else None
    if entry is None or not _plain_name(name):
        raise CheckpointError(f"{uri}: {name} is not listed in its {MANIFEST}; only listed files are read")
    fs, path = resolve(uri, storage_options)
    try:
        with fs.open(join(path, name), "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CheckpointError(f"{uri}/{name}: listed in the manifest but missing") from None
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"{uri}/{name}: its size or sha256 does not match the manifest (changed since written)")
    table = pq.read_table(io.BytesIO(data))
    if filter_ids is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["global_id"], value_set=pa.array(filter_ids, pa.int64())))
    return table


def read_rows(uri: str, manifest: dict[str, Any], global_ids: np.ndarray,
              storage_options: dict[str, Any] | None = None, shards: list[int] | None = None) -> pa.Table:
    """The shard rows of ``global_ids`` (sorted ascending), gathered from the shards that hold them."""
    world = int(manifest["world_size"])
    ranks = range(world) if shards is None else shards
    want = np.asarray(global_ids, dtype=np.int64)
    parts = [read_table(uri, shard_name(r, world), storage_options, want, manifest=manifest) for r in ranks]
    table = pa.concat_tables(parts).sort_by("global_id")
    got = table["global_id"].to_numpy()
    if got.shape != want.shape or not np.array_equal(got, np.sort(want)):
        missing = np.setdiff1d(want, got)
        raise CheckpointError(f"{uri}: {missing.shape[0]} of the requested rows are in no shard "
                              f"(first: node {int(missing[0]) if missing.size else '?'})")
    return table


def read_residuals(uri: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None,
                   ranks: list[int] | None = None) -> pa.Table:
    world = int(manifest["world_size"])
    files = [residual_name(r, world) for r in (range(world) if ranks is None else ranks)]
    return pa.concat_tables([read_table(uri, f, storage_options, manifest=manifest)
                            for f in files if f in manifest["files"]])


def new_manifest(*, step: int, epoch: int, phase: str, shard_method: str, world_size: int, config: dict,
                 data: dict, partition: dict, files: dict, progress: dict, history: list) -> dict[str, Any]:
    model = config["model"]
    return {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": int(step), "epoch": int(epoch), "phase": phase, "shard_method": shard_method,
        "world_size": int(world_size),
        "model": {"method": model["method"], "bits": model["bits"], "dim": model["dim"],
                  "num_layers": model["num_layers"], "phi": model["phi"], "level_dtype": model["level_dtype"],
                  "lsq_step": model.get("lsq_step", "tensor")},
        "config": config, "data": data, "partition": partition, "files": files,
        "progress": progress, "history": history,
    }


def build_for_rows(manifest: dict[str, Any], n: int, graph=None, latent_lr: float | None = None) -> EmbeddingMethod:
    """An empty method of the checkpoint's phase for ``n`` rows (BiGeaR packing needs ``graph``).
    ``latent_lr``: gnaq_lat's latent step for a run that goes on training (else the number the
    checkpoint's config gave, if any: export and evaluation do not step)."""
    model = manifest["model"]
    name = manifest["shard_method"]
    bits = None if name == "fp" else model["bits"]
    options = {"phi": model["phi"], "per_row": model.get("lsq_step", "tensor") == "node"}
    trained = manifest.get("config", {}).get("model", {})  # gnaq_lat's latent width (the rows' shape), as trained
    if trained.get("latent_bits") is not None:
        options["latent_bits"] = trained["latent_bits"]
    step = latent_lr if latent_lr is not None else trained.get("latent_lr")
    if isinstance(step, (int, float)) and not isinstance(step, bool):  # "auto" resolves against a run's plan
        options["latent_lr"] = float(step)
    if manifest.get("config", {}).get("seed") is not None:  # gnaq_lat's rounding noise is keyed by the run's seed
        options["seed"] = manifest["config"]["seed"]
    if graph is not None and name == "bigear":
        options["graph"] = graph
    with torch.random.fork_rng():
        return build_method(name, max(n, 1), model["dim"], bits, model["num_layers"], **options)


def load_for_export(uri: str, storage_options: dict[str, Any] | None = None):
    """``(manifest, kind, table, data)`` of a checkpoint, for ``gnaq export``.

    Reads every shard into one method over all rows and packs it as the evaluator does:
    ``kind`` is ``"packed"`` (a PackedTable) or ``"fp"`` (a float32 (N, d) numpy array):
    numpy, as :func:`gnaq_dist.export.export_bundle` takes them.
    ``data`` is the training dataset the manifest names (its id maps and train edges).
    """
    manifest = verify(uri, storage_options)
    dataset = manifest["config"].get("dataset")
    if not dataset:
        raise CheckpointError(f"{uri}: the manifest names no dataset (trained on in-memory data)")
    data = load_dataset(dataset, manifest["config"].get("storage_options") or None)
    key = data_key(data)
    if key["train_sha256"] != manifest["data"]["train_sha256"]:
        raise CheckpointError(f"{uri}: dataset {dataset} has changed since the checkpoint was written")
    kind, table = load_table(uri, manifest, data, storage_options)
    return manifest, kind, table.numpy() if kind == "fp" else table, data


def load_table(uri: str, manifest: dict[str, Any], data: InteractionData,
               storage_options: dict[str, Any] | None = None) -> tuple[str, Any]:
    """``(kind, table)`` of a verified checkpoint of ``data``: every shard read into one method,
    packed as the evaluator packs it (shared by ``gnaq export`` and ``gnaq evaluate``)."""
    from gnaq_dist.graph import build_graph

    n = data.n_nodes
    rows = read_rows(uri, manifest, np.arange(n, dtype=np.int64), storage_options)
    graph = build_graph(data) if manifest["shard_method"] == "bigear" else None
    try:
        method = build_for_rows(manifest, n, graph)
        load_rows(method, rows)
    except GnaqInputError as exc:
        raise CheckpointError(f"{uri}: {exc}") from None
    load_dense(method, read_table(uri, "dense.parquet", storage_options, manifest=manifest), None)
    if method.name == "fp":
        return "fp", method.weight.detach().clone()
    if method.name == "bigear":
        method.init_from_full_precision(method.weight.detach().clone())
    level_dtype = getattr(torch, manifest["model"]["level_dtype"])
    return "packed", method.pack(level_dtype=level_dtype)


__all__ = [
    "CheckpointError", "CheckpointStore", "Loaded", "REPLICATED_FILES", "build_for_rows",
    "check_data", "check_manifest", "check_model", "checkpoint_name", "choose_resume", "data_key",
    "dense_table", "load_dense", "load_for_export", "load_rows", "load_table", "new_manifest", "parquet_bytes",
    "read_manifest", "read_residuals", "read_rows", "read_table", "residual_name", "residual_table", "shard_name",
    "shard_table", "verify",
]
