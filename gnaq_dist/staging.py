"""Local staging that proves its writer is alive, and the removal of staging whose writer is dead.

Why: a writer killed with SIGKILL (or a power cut) cannot remove its hidden staging
folder (``.OUT.staging-*``) or temporary file (``.NAME.tmp-*``); nothing removed them,
and a later run cannot tell a dead writer's leftovers from a live writer's work in
progress by name or age alone. So each writer holds an exclusive ``flock`` on its own
staging folder or file for as long as it writes (:func:`hold`); the kernel drops the lock
when the process ends, however it ends. A later writer to the same output takes each
sibling's lock without waiting (:func:`remove_stale`): if it gets it, the writer is dead
and the leftover goes; if not, the writer is alive and it stays. Entries younger than
:data:`MIN_AGE_S` are left alone (their writer may not have taken its lock yet).
A commit's moved-aside old output (``.OUT.old-*``) is removed by the next commit to that
output, under the commit lock that every committer holds while one exists
(:mod:`gnaq_dist.concurrency`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time

MIN_AGE_S = 5.0


def hold(path: str) -> int:
    """An open descriptor of ``path`` (a folder or file) with this process's exclusive lock on it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _dead(path: str) -> bool:
    """No process holds ``path``'s lock (taken and dropped at once), and it is old enough."""
    try:
        if time.time() - os.lstat(path).st_mtime < MIN_AGE_S or os.path.islink(path):
            return False
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


def remove_stale(parent: str, name: str, kinds: tuple[str, ...] = ("staging", "tmp")) -> list[str]:
    """Remove ``.NAME.<kind>-*`` entries of ``parent`` whose writer is dead; returns their paths."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for entry in entries:
        if any(entry.startswith(f".{name}.{kind}-") for kind in kinds):
            path = os.path.join(parent, entry)
            if _dead(path):
                _remove(path)
                removed.append(path)
    return removed


def remove_moved_aside(parent: str, name: str) -> list[str]:
    """Remove ``.NAME.old-*`` left by a committer that died mid-commit (call under the commit lock)."""
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    for entry in entries:
        if entry.startswith(f".{name}.old-"):
            path = os.path.join(parent, entry)
            _remove(path)
            removed.append(path)
    return removed


__all__ = ["MIN_AGE_S", "hold", "release", "remove_moved_aside", "remove_stale"]
