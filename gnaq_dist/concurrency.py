"""Writers that cannot lose each other's work: a compare-and-swap on an output's commit mark.

Why: two ``gnaq ingest --append`` runs onto one dataset both read version N and both
committed N+1, so one append's rows were lost; two ingests to one new OUT both
succeeded, the second silently replacing the first. :class:`gnaq_dist.storage.AtomicOutput`
now remembers the commit mark it saw when it started (its bytes, or that there was
none) and commits only if that is still the mark at OUT; otherwise the writer aborts,
removes what it wrote and raises :class:`ConcurrentWriteError` (one line, exit 2).
How the compare and the swap are made one step depends on the store:

* local disks: the check and the rename run under an exclusive ``flock`` on OUT's parent
  directory (:func:`commit_lock`), held only for the commit itself and released by the
  kernel if the process dies; a rename onto a non-empty directory fails in the kernel.
* S3 (s3fs): conditional writes, ``If-None-Match: *`` for a new mark and ``If-Match:
  <ETag>`` for a replaced one (:func:`put_mark`): the store itself refuses the loser
  (HTTP 412). Needs an S3 that implements them (AWS since 2024, MinIO, moto).
* any other fsspec store (gcs, azure, memory, ...): the mark is re-read and compared just
  before it is written; a writer that commits in between is not detected. docs/reliability.md
  lists what each backend guarantees.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Any

from gnaq_dist.errors import GnaqInputError

LOCK_TIMEOUT_S = 60.0


class ConcurrentWriteError(GnaqInputError):
    """Another writer committed OUT while this one ran; this one changed nothing."""


@contextlib.contextmanager
def commit_lock(directory: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` (the output's parent) for one local commit."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GnaqInputError(f"{directory}: another gnaq writer has held the commit lock on this "
                                         f"folder for {timeout:g} s; try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def local_mark(path: str) -> bytes | None:
    """The bytes of a local commit mark, or None where there is none."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocol))


def remote_mark(fs: Any, path: str) -> tuple[bytes | None, str | None]:
    """``(bytes, ETag)`` of a commit mark on an object store (None, None where there is none).

    The ETag is read before and after the bytes and must agree (else read again), so the
    pair belongs to one version of the mark. Stores without ETags give ``(bytes, None)``.
    """
    for _ in range(5):
        try:
            before = fs.info(path, refresh=True).get("ETag") if _is_s3(fs) else None
            data = fs.cat_file(path)
            after = fs.info(path, refresh=True).get("ETag") if _is_s3(fs) else None
        except FileNotFoundError:
            return None, None
        if before == after:
            return data, after
    raise ConcurrentWriteError(f"{path}: its commit mark keeps changing while being read (another writer)")


def put_mark(fs: Any, path: str, data: bytes, seen: bytes | None, etag: str | None) -> None:
    """Write the commit mark only if the one at ``path`` is still ``seen`` (None: none there).

    Raises :class:`ConcurrentWriteError` when another writer's mark is there instead.
    """
    if _is_s3(fs):
        try:
            if seen is None:
                fs.pipe_file(path, data, mode="create")  # If-None-Match: *
            else:
                fs.pipe_file(path, data, IfMatch=etag or "")
            fs.invalidate_cache(path)
            return
        except (FileExistsError, OSError) as exc:
            fs.invalidate_cache(path)
            now, _ = remote_mark(fs, path)
            if now != seen:
                raise ConcurrentWriteError(f"{path}: another writer committed while this one ran") from None
            raise GnaqInputError(f"{path}: the conditional write of the commit mark failed ({exc})") from None
    now, _ = remote_mark(fs, path)
    if now != seen:
        raise ConcurrentWriteError(f"{path}: another writer committed while this one ran")
    with fs.open(path, "wb") as handle:
        handle.write(data)


__all__ = ["ConcurrentWriteError", "LOCK_TIMEOUT_S", "commit_lock", "local_mark", "put_mark", "remote_mark"]
