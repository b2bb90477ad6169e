"""LightGCN benchmark text splits (``train.txt`` / ``test.txt``: "u i i i ...").

Ids are 0-based ints; they are numbered in ascending order so that a benchmark's
user/item ids keep the same indices after conversion (users listed with no items are
kept, so the user count matches the published one).
"""

from __future__ import annotations

import numpy as np

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.ingest.edges import TEST, TRAIN, Edges
from gnaq_dist.ingest.idmap import IdMap
from gnaq_dist.storage import join, resolve

INT64_MAX = int(np.iinfo(np.int64).max)


def _refuse_token(path: str, lineno: int, parts: list[str]) -> None:
    """The one-line error for the first token of a line that is not an int64 id."""
    for token in parts:
        digits = token[1:] if token[:1] in "+-" else token
        if not (digits.isascii() and digits.isdigit()):
            raise GnaqInputError(f"{path}: line {lineno}: {token[:40]!r} is not an integer id (ASCII digits)")
        if int(token) > INT64_MAX:
            raise GnaqInputError(f"{path}: line {lineno}: id {token[:40]} is above the int64 range")
        if int(token) < 0:
            raise GnaqInputError(f"{path}: line {lineno}: negative id {token[:40]}")
    raise GnaqInputError(f"{path}: line {lineno}: not a line of integer ids")


def _parse(fs, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (users listed, edge users, edge items) as int64."""
    try:
        with fs.open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):  # a missing file, or SOURCE is a file, not a folder
        raise GnaqInputError(f"{path}: path not found (a LightGCN folder needs train.txt and test.txt)") from None
    except IsADirectoryError:
        raise GnaqInputError(f"{path}: a directory, not a LightGCN text file") from None
    except UnicodeDecodeError:
        raise GnaqInputError(f"{path}: not a LightGCN text file (not UTF-8 text)") from None
    listed, users, items = [], [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if not line.isascii():  # int() would take other scripts' digits
                raise ValueError
            ids = np.array(parts, dtype=np.int64)
        except (ValueError, OverflowError):
            _refuse_token(path, lineno, parts)
        if (ids < 0).any():
            raise GnaqInputError(f"{path}: line {lineno}: negative id {int(ids[ids < 0][0])}")
        listed.append(ids[0])
        users.append(np.full(len(ids) - 1, ids[0], dtype=np.int64))
        items.append(ids[1:])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return np.array(listed, dtype=np.int64), cat(users), cat(items)


def read_lightgcn(uri: str, storage_options: dict | None = None) -> tuple[Edges, IdMap, IdMap, list[tuple[str, int, str]], int]:
    """Folder -> (edges labelled train/test, user map, item map, [(path, size, stamp)], rows)."""
    fs, base = resolve(uri, storage_options)
    if not fs.exists(base):
        raise GnaqInputError(f"{uri}: path not found")
    parts, files = [], []
    for name, label in (("train.txt", TRAIN), ("test.txt", TEST)):
        path = join(base, name)
        listed, u, i = _parse(fs, path)
        info = fs.info(path)
        files.append((path, int(info.get("size") or 0), str(info.get("mtime") or info.get("ETag") or info.get("created") or "")))
        parts.append((listed, u, i, label))
    all_users = np.unique(np.concatenate([p[0] for p in parts] + [p[1] for p in parts]))
    all_items = np.unique(np.concatenate([p[2] for p in parts]))
    rows = sum(len(p[1]) for p in parts)
    if rows == 0:
        raise GnaqInputError(f"{uri}: empty dataset (train.txt and test.txt hold no interactions)")
    users = IdMap("int", all_users.tolist())
    items = IdMap("int", all_items.tolist())
    u = np.concatenate([p[1] for p in parts])
    i = np.concatenate([p[2] for p in parts])
    label = np.concatenate([np.full(len(p[1]), p[3], dtype=np.int8) for p in parts])
    edges = Edges(np.searchsorted(all_users, u).astype(np.int32), np.searchsorted(all_items, i).astype(np.int32), label=label)
    return edges, users, items, files, rows
