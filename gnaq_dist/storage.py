"""Where data lives, and the one atomic writer: fsspec URI resolution, checksums, all-or-nothing output.

Every reader and writer goes through here so that local paths, ``memory://`` and
``s3://`` behave the same, and so that a failed or crashed write never leaves something
that looks complete. Datasets, partitions, bundles, generated logs, checkpoints and
``gnaq recommend --output`` all write through the two forms below.

* :class:`AtomicOutput` (a directory, one writer): on the local filesystem everything
  is written into a hidden sibling staging directory that is ``os.rename``-d into place
  (an existing output is moved aside first, then deleted); on other filesystems the
  data files come first and the commit mark (``manifest.json``, ``bundle.json``, ...)
  LAST: readers refuse a directory without one, and files of a new version never reuse
  a name the current one references, so the old version stays readable until its mark
  is replaced. On failure, whatever this attempt wrote is removed.
* :func:`atomic_path` / :func:`write_file` (one file; several writers may fill one
  directory, as a checkpoint's ranks do): written beside the target and renamed over it
  locally; an object store publishes a PUT whole.

fsspec is imported only to resolve a URI, so the numpy-only edge reader
(:mod:`gnaq_dist.serving`) can use :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from gnaq_dist.errors import GnaqInputError

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs as pafs

MANIFEST = "manifest.json"


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URI or local path -> (fsspec filesystem, path inside it)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        raise GnaqInputError(f"{uri}: cannot open this location ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return fs, path.rstrip("/") or path


def _is_uri(location: str) -> bool:
    """Whether ``location`` names a scheme (``s3://...``, ``file://...``) rather than a plain local path."""
    return "://" in str(location)


def absolute_if_local(location: str) -> str:
    """A plain local path made absolute (another process, another working directory reads it);
    a URI as it is."""
    return location if not location or _is_uri(location) else os.path.abspath(location)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{exc.__class__.__name__}: {line}" if line else exc.__class__.__name__


def check_writable(uri: str, storage_options: dict[str, Any] | None = None, what: str = "--out") -> None:
    """Refuse, before anything runs, an output location this process cannot write.

    An unknown scheme (or one whose fsspec package is not installed) fails to resolve. A local
    path must be, or lie under, a writable directory (nothing is created here). Any other
    store gets a small probe object under ``uri``, written and deleted: missing credentials,
    a missing bucket or a refused write fail here, not after the data is read. Every failure
    is a :class:`GnaqInputError` naming ``uri`` (``what`` says which setting it came from).
    """
    try:
        fs, path = resolve(uri, storage_options)
    except GnaqInputError as exc:
        raise GnaqInputError(f"{what} {exc}") from None
    if is_local(fs):
        target = os.path.abspath(path)
        probe = target
        while not os.path.lexists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not os.path.isdir(probe):
            raise GnaqInputError(f"{what} {uri}: {probe} is a file, not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise GnaqInputError(f"{what} {uri}: {probe} is not writable")
        return
    probe = join(path, f".gnaq-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        fs.pipe_file(probe, b"")
    except Exception as exc:  # noqa: BLE001 - credentials, bucket, permissions, network: all mean "cannot write"
        raise GnaqInputError(f"{what} {uri}: cannot write there ({_first_line(exc)})") from None
    try:
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001
        raise GnaqInputError(f"{what} {uri}: wrote a probe object but cannot delete it ({_first_line(exc)}); "
                             f"checkpoint retention needs deletes") from None


def write_text(uri: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write one text file at ``uri`` (any fsspec URI), all or nothing (:func:`write_file`)."""
    fs, path = resolve(uri, storage_options)
    write_file(fs, path, text.encode("utf-8"))


def arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow view of an fsspec filesystem (memory:// paths need a leading '/')."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

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


# -- local commits ---------------------------------------------------------------------------
def _fsync(path: str) -> None:
    """Flush a written file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_in_place(src: str, target: str) -> None:
    """Rename ``src`` onto ``target``. A file replaces a file in one ``os.replace``; a
    directory, or anything over a directory, moves the old one aside first (put back if
    the rename fails) and deletes it after."""
    aside = None
    if os.path.lexists(target) and (os.path.isdir(src) or os.path.isdir(target)):
        if os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target):
            os.rmdir(target)
        else:
            parent, name = os.path.split(target)
            aside = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(target, aside)
    try:
        os.replace(src, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.remove(aside)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """A temporary local path beside ``path`` to write one file to; when the block ends
    without an error it is synced and renamed onto ``path``, otherwise removed.

    ``overwrite=False`` refuses to replace an output that appeared meanwhile.
    """
    from gnaq_dist.staging import hold, release, remove_stale

    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    remove_stale(parent, name, ("tmp",))  # a dead writer's temporary files of this target
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    held = hold(tmp)  # while this process lives, a later writer leaves the file alone
    try:
        yield tmp
        if not overwrite and os.path.lexists(path):
            raise GnaqInputError(f"{path}: output appeared while writing (use --overwrite)")
        _fsync(tmp)
        _put_in_place(tmp, path)
    finally:
        release(held)
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` so that ``path`` holds all of it or nothing; returns its manifest
    entry (``bytes``, ``sha256`` of the bytes meant to be written, which readers check)."""
    parent = posixpath.dirname(path)
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            handle.write(data)
    else:
        fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as handle:
            handle.write(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _listed(manifest: Any) -> set[str]:
    """File names a commit mark references (its ``files``: a dict or a list of entries with a ``path``)."""
    files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    entries = files.values() if isinstance(files, dict) else files
    return {entry["path"] for entry in entries}


class AtomicOutput:
    """Write an output directory so that it appears complete or not at all.

    ``mode``: "create" (error if ``uri`` exists), "overwrite" (replace whatever is there)
    or "replace" (a new version of the output at ``uri``, which must exist). Whatever the
    mode, the commit succeeds only if the mark at ``uri`` is still the one seen on entering
    (none, for "create"), and ``expect`` (key -> value) must hold in that mark: a writer that
    lost a race raises :class:`gnaq_dist.concurrency.ConcurrentWriteError` and leaves
    nothing behind (see :mod:`gnaq_dist.concurrency` for how each store makes it atomic). ``mark`` is
    the commit mark's file name; ``exists_error`` the message (``{uri}`` filled in) for an
    existing output in "create" mode; ``file_error``, if given, refuses a file at ``uri``.
    Use as a context manager; write with :meth:`write_parquet`, :meth:`write_bytes` or
    :meth:`new_file`, then :meth:`commit` with the mark's content. Leaving the block
    without commit (or by an exception) removes everything this attempt wrote.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, mode: str = "create", *,
                 mark: str = MANIFEST,
                 exists_error: str = "{uri}: output already exists (use --overwrite, or --append to add to it)",
                 file_error: str | None = None, expect: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.expect = expect
        self.fs, self.path = resolve(uri, storage_options)
        self.mode = mode
        self.mark = mark
        self.exists_error = exists_error
        self.file_error = file_error
        self.local = is_local(self.fs)
        self.written: list[str] = []
        self.committed = False
        self.old_files: set[str] = set()  # names of the current output, removed after the commit (remote)
        self.taken: set[str] = set()  # names a new file must not use (remote)
        self.token = uuid.uuid4().hex[:12]  # this attempt's: its staging folder, its file names (remote)
        self.seen: bytes | None = None  # the commit mark at entry: the commit swaps it only if still there
        self.etag: str | None = None
        self._held: int | None = None  # the lock on the local staging folder

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> AtomicOutput:
        from gnaq_dist.concurrency import local_mark, remote_mark

        exists = output_exists(self.fs, self.path)
        if exists and self.mode == "create":
            raise GnaqInputError(self.exists_error.format(uri=self.uri))
        if exists and self.file_error is not None and not self.fs.isdir(self.path):
            raise GnaqInputError(self.file_error.format(uri=self.uri))
        if self.local:
            if exists:
                self.seen = local_mark(os.path.join(os.path.abspath(self.path), self.mark))
        elif exists:
            self.seen, self.etag = remote_mark(self.fs, join(self.path, self.mark))
        self._check_expected()
        if self.local:
            from gnaq_dist.staging import hold, remove_stale

            parent, name = os.path.split(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            remove_stale(parent, name)  # staging of writers to this OUT that died (SIGKILL, power cut)
            self.stage = os.path.join(parent, f".{name}.staging-{self.token}")
            os.makedirs(self.stage)
            try:
                self._held = hold(self.stage)  # proves this writer alive to the others
            except BaseException:  # a signal before the with-block owns the folder: no __exit__ will remove it
                shutil.rmtree(self.stage, ignore_errors=True)
                raise
        else:
            self.stage = self.path
            if exists:
                self.taken = {posixpath.basename(p) for p in self.fs.ls(self.path, detail=False)}
                if self.seen is not None:
                    try:
                        self.old_files = _listed(json.loads(self.seen.decode("utf-8")))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        self.old_files = set()
                if self.mode == "overwrite":
                    # files of the old output that are not ours: removed after the commit
                    self.old_files |= {n for n in self.taken if n != self.mark}
        return self

    def _check_expected(self) -> None:
        """``expect`` holds in the mark seen on entry (what the caller read earlier is still there)."""
        if not self.expect:
            return
        from gnaq_dist.concurrency import ConcurrentWriteError

        try:
            seen = json.loads(self.seen.decode("utf-8")) if self.seen is not None else None
        except (ValueError, UnicodeDecodeError):
            seen = None
        if not isinstance(seen, dict) or any(seen.get(k) != v for k, v in self.expect.items()):
            now = seen.get("version") if isinstance(seen, dict) else None
            raise ConcurrentWriteError(
                f"{self.uri}: changed since this run read it (version {now!r} now, {self.expect.get('version')!r} "
                f"read): another writer committed first; nothing was written, run again")

    def _lost(self, now: bytes | None) -> GnaqInputError:
        from gnaq_dist.concurrency import ConcurrentWriteError

        version = None
        try:
            version = json.loads(now.decode("utf-8")).get("version") if now else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            pass
        what = f" (version {version})" if version is not None else ""
        return ConcurrentWriteError(f"{self.uri}: another writer committed it{what} while this one ran; "
                                    f"nothing was written, run again")

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def abort(self) -> None:
        """Remove what this attempt wrote; the previous output (if any) is untouched."""
        if self.local:
            from gnaq_dist.staging import release

            shutil.rmtree(self.stage, ignore_errors=True)
            release(self._held)
            self._held = None
        else:
            for path in self.written:
                try:
                    self.fs.rm(path)
                except (FileNotFoundError, OSError):
                    pass
        self.written = []

    # -- writing ---------------------------------------------------------------------
    def unique_name(self, name: str) -> str:
        """``name`` in a local staging folder (private to this attempt); on an object store
        ``stem.<token>.ext``, this attempt's own name: a concurrent writer to the same OUT
        never writes over (or, aborting, deletes) another's files."""
        if self.local and name not in {posixpath.basename(p) for p in self.written}:
            return name
        stem, ext = name.rsplit(".", 1) if "." in name else (name, "")
        token = self.token if not self.local else uuid.uuid4().hex[:8]
        unique = f"{stem}.{token}" + (f".{ext}" if ext else "")
        if unique in self.taken or unique in {posixpath.basename(p) for p in self.written}:
            unique = f"{stem}.{uuid.uuid4().hex[:12]}" + (f".{ext}" if ext else "")
        return unique

    def new_file(self, name: str) -> str:
        """Where to write file ``name`` (in ``self.fs``; a local path when :attr:`local`),
        registered so that an abort removes it."""
        path = os.path.join(self.stage, name) if self.local else join(self.stage, name)
        self.written.append(path)
        return path

    def write_parquet(self, name: str, table: pa.Table, **options: Any) -> dict[str, Any]:
        """Write ``table`` as Parquet file ``name`` (zstd; ``options`` go to
        ``pq.write_table``), under a fresh name if the current output uses it; returns its
        manifest entry."""
        name = self.unique_name(name)
        path = self.new_file(name)
        with self.fs.open(path, "wb") as handle:
            pq.write_table(table, handle, **{"compression": "zstd", **options})
        return {"path": name, "rows": table.num_rows, "bytes": int(self.fs.size(path)), "sha256": sha256_of(self.fs, path)}

    def write_bytes(self, name: str, data: bytes) -> str:
        path = self.new_file(name)
        with self.fs.open(path, "wb") as handle:
            handle.write(data)
        return path

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the commit mark (``manifest`` as JSON) and make the new output the visible one,
        if no other writer committed since this one started (else :class:`ConcurrentWriteError`)."""
        from gnaq_dist.concurrency import ConcurrentWriteError, commit_lock, local_mark, put_mark

        data = json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8")
        if self.local:
            target = os.path.abspath(self.path)
            mark_path = os.path.join(self.stage, self.mark)
            with open(mark_path, "wb") as handle:
                handle.write(data)
            _fsync(mark_path)
            with commit_lock(os.path.dirname(target)):
                now = local_mark(os.path.join(target, self.mark))
                if self.mode == "create" and output_exists(self.fs, target):
                    if now is not None:
                        raise self._lost(now)
                    raise GnaqInputError(self.exists_error.format(uri=self.uri) + " (it appeared while writing)")
                if now != self.seen:
                    raise self._lost(now)
                from gnaq_dist.staging import release, remove_moved_aside

                remove_moved_aside(*os.path.split(target))  # a committer that died mid-commit left it
                _put_in_place(self.stage, target)
            self.committed = True
            release(self._held)
            self._held = None
        else:
            try:
                put_mark(self.fs, join(self.path, self.mark), data, self.seen, self.etag)
            except ConcurrentWriteError:
                from gnaq_dist.concurrency import remote_mark

                raise self._lost(remote_mark(self.fs, join(self.path, self.mark))[0]) from None
            self.committed = True
            keep = _listed(manifest) | {self.mark}
            for name in sorted(self.old_files - keep):
                try:
                    self.fs.rm(join(self.path, name), recursive=True)
                except (FileNotFoundError, OSError):
                    pass
