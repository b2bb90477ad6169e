"""Cleaning of mapped interactions: de-duplication, k-core, known-pair removal.

Pure functions over :class:`Edges`; row order is preserved (it defines the order in
which ids are numbered), so results are deterministic.
"""

from __future__ import annotations

import numpy as np

from gnaq_dist.ingest.edges import Edges


def _pair_keys(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """One int64 per (user, item) pair."""
    return (user.astype(np.int64) << 32) | item.astype(np.int64)


def dedup(edges: Edges) -> tuple[Edges, int]:
    """Keep one row per (user, item): the latest timestamp (ties and no time: the last row)."""
    n = len(edges)
    if n == 0:
        return edges, 0
    keys = _pair_keys(edges.user, edges.item)
    order = np.argsort(keys, kind="stable")  # grouped by pair, file order within a pair
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    if not same.any():
        return edges, 0
    if edges.timestamp is not None:
        # re-order only rows of repeated pairs by time (stable: equal times keep file order)
        dup = np.zeros(n, dtype=bool)
        dup[1:] |= same
        dup[:-1] |= same
        sub = order[dup]
        order[dup] = sub[np.lexsort((edges.timestamp[sub], keys[sub]))]
    del keys
    last = np.ones(n, dtype=bool)
    last[:-1] = ~same
    kept = np.sort(order[last])
    if len(kept) == n:
        return edges, 0
    return edges.take(kept), n - len(kept)


def kcore(edges: Edges, n_users: int, n_items: int, k_users: int, k_items: int) -> tuple[Edges, int]:
    """Iteratively drop rows of users with < k_users and items with < k_items interactions."""
    if (k_users <= 1 and k_items <= 1) or len(edges) == 0:
        return edges, 0
    keep = np.ones(len(edges), dtype=bool)
    while True:
        du = np.bincount(edges.user[keep], minlength=n_users)
        di = np.bincount(edges.item[keep], minlength=n_items)
        ok = keep & (du[edges.user] >= k_users) & (di[edges.item] >= k_items)
        if ok.sum() == keep.sum():
            break
        keep = ok
    dropped = int(len(edges) - keep.sum())
    return (edges.take(np.flatnonzero(keep)) if dropped else edges), dropped


def drop_known_pairs(edges: Edges, known_user: np.ndarray, known_item: np.ndarray) -> tuple[Edges, int]:
    """Drop rows whose (user, item) pair is already in an existing dataset (incremental ingest)."""
    if len(edges) == 0 or len(known_user) == 0:
        return edges, 0
    hit = np.isin(_pair_keys(edges.user, edges.item), _pair_keys(known_user, known_item))
    dropped = int(hit.sum())
    return (edges.take(np.flatnonzero(~hit)) if dropped else edges), dropped
