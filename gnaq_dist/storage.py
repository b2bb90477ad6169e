"""Where datasets live: fsspec URI resolution, checksums and atomic output.

Every reader and writer goes through here so that local paths, ``memory://`` and
``s3://`` behave the same, and so that a failed or crashed ingest never leaves a
directory that looks like a complete dataset:

* local filesystem: everything is written into a hidden sibling staging directory that
  is ``os.rename``-d into place (an existing dataset is moved aside first, then deleted);
* other filesystems: data files first, ``manifest.json`` LAST (the manifest is the commit
  mark; readers refuse a directory without one); files of a new version never reuse a
  name the current manifest references, so the old version stays readable until its
  manifest is replaced. On failure, whatever this attempt wrote is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from gnaq_dist.errors import GnaqInputError

MANIFEST = "manifest.json"


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URI or local path -> (fsspec filesystem, path inside it)."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        raise GnaqInputError(f"{uri}: cannot open this location ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return fs, path.rstrip("/") or path


def arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow view of an fsspec filesystem (memory:// paths need a leading '/')."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, name: str) -> str:
    return posixpath.join(base, name) if not base.endswith("/") else base + name


def sha256_of(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 20) -> str:
    """Streamed sha256 of one file (constant memory)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _nonempty(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        if not fs.exists(path):
            return False
        if not fs.isdir(path):
            return True
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def output_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """A non-empty directory or a file at ``path`` counts as an existing output."""
    return _nonempty(fs, path)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read().decode("utf-8"))


class AtomicOutput:
    """Write a dataset directory so that it appears complete or not at all.

    ``mode``: "create" (error if ``uri`` exists), "overwrite" (replace whatever is there)
    or "replace" (a new version of the dataset at ``uri``, which must exist).
    Use as a context manager; call :meth:`write_parquet` / :meth:`write_bytes`, then
    :meth:`commit` with the manifest. Leaving the block without commit (or by an
    exception) removes everything this attempt wrote.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, mode: str = "create") -> None:
        self.uri = uri
        self.fs, self.path = resolve(uri, storage_options)
        self.mode = mode
        self.local = is_local(self.fs)
        self.written: list[str] = []
        self.committed = False
        self.old_files: set[str] = set()  # names referenced by the current manifest (remote)
        self.taken: set[str] = set()  # names a new file must not use (remote)

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "AtomicOutput":
        exists = output_exists(self.fs, self.path)
        if exists and self.mode == "create":
            raise GnaqInputError(f"{self.uri}: output already exists (use --overwrite, or --append to add to it)")
        if self.local:
            parent, name = os.path.split(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self.stage = os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")
            os.makedirs(self.stage)
        else:
            self.stage = self.path
            if exists:
                self.taken = {posixpath.basename(p) for p in self.fs.ls(self.path, detail=False)}
                manifest_path = join(self.path, MANIFEST)
                if self.fs.exists(manifest_path):
                    try:
                        files = read_json(self.fs, manifest_path).get("files", {})
                        self.old_files = {entry["path"] for entry in files.values()}
                    except (ValueError, KeyError, TypeError):
                        self.old_files = set()
                if self.mode == "overwrite":
                    # files of the old dataset that are not ours: removed after the commit
                    self.old_files |= {n for n in self.taken if n != MANIFEST}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def abort(self) -> None:
        """Remove what this attempt wrote; the previous dataset (if any) is untouched."""
        if self.local:
            shutil.rmtree(self.stage, ignore_errors=True)
        else:
            for path in self.written:
                try:
                    self.fs.rm(path)
                except (FileNotFoundError, OSError):
                    pass
        self.written = []

    # -- writing ---------------------------------------------------------------------
    def unique_name(self, name: str) -> str:
        """``name`` unless the current dataset uses it; then ``stem.<token>.ext``."""
        if name not in self.taken and name not in {posixpath.basename(p) for p in self.written}:
            return name
        stem, ext = name.split(".", 1) if "." in name else (name, "")
        return f"{stem}.{uuid.uuid4().hex[:8]}" + (f".{ext}" if ext else "")

    def _target(self, name: str) -> str:
        return os.path.join(self.stage, name) if self.local else join(self.stage, name)

    def write_parquet(self, name: str, table: pa.Table) -> dict[str, Any]:
        """Write ``table`` as Parquet file ``name``; returns its manifest entry."""
        name = self.unique_name(name)
        path = self._target(name)
        self.written.append(path)
        with self.fs.open(path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
        return {"path": name, "rows": table.num_rows, "bytes": int(self.fs.size(path)), "sha256": sha256_of(self.fs, path)}

    def write_bytes(self, name: str, data: bytes) -> str:
        path = self._target(name)
        self.written.append(path)
        with self.fs.open(path, "wb") as handle:
            handle.write(data)
        return path

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the manifest (the commit mark) and make the new dataset the visible one."""
        data = json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8")
        if self.local:
            with open(os.path.join(self.stage, MANIFEST), "wb") as handle:
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
                shutil.rmtree(aside, ignore_errors=True) if os.path.isdir(aside) else os.remove(aside)
        else:
            with self.fs.open(join(self.path, MANIFEST), "wb") as handle:
                handle.write(data)
            self.committed = True
            keep = {entry["path"] for entry in manifest.get("files", {}).values()} | {MANIFEST}
            for name in sorted(self.old_files - keep):
                try:
                    self.fs.rm(join(self.path, name), recursive=True)
                except (FileNotFoundError, OSError):
                    pass
