"""Train/test/valid assignment strategies; each returns an int8 label per row.

Per-user rules (random, temporal_user) never empty a user's training set: a user with
n interactions gives at most n-1 to test+valid, and a user with a single interaction
stays in train. Counts use round-half-up: ``n_test = floor(f*n + 0.5)``, at least 1
when n >= 2 and the fraction is > 0.
"""

from __future__ import annotations

import numpy as np

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.ingest.config import SplitConfig
from gnaq_dist.ingest.edges import TEST, TRAIN, TS_NULL, VALID, Edges


def _share(n: np.ndarray, room: np.ndarray, fraction: float, fixed: int | None) -> np.ndarray:
    """Rows to hold out per user: ``fixed`` each, or round(fraction * n) but at least 1,
    never more than ``room`` (the rows the user can spare)."""
    if fixed is not None:
        return np.minimum(fixed, room)
    if fraction > 0:
        wanted = np.clip(np.floor(fraction * n + 0.5), 1, None).astype(np.int64)
        return np.where(room >= 1, np.minimum(wanted, room), 0)
    return np.zeros_like(n)


def _holdout_counts(n: np.ndarray, test_fraction: float, valid_fraction: float,
                   test_n: int | None = None, valid_n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-user (n_test, n_valid) from user sizes ``n``, keeping >= 1 training row per user."""
    n = n.astype(np.int64)
    cap = np.maximum(n - 1, 0)
    n_test = _share(n, cap, test_fraction, test_n)
    n_valid = _share(n, cap - n_test, valid_fraction, valid_n)
    return n_test, n_valid


def _rank_labels(user: np.ndarray, order: np.ndarray, n_users: int, n_test: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
    """``order`` lists rows grouped by user, held-out rows first within each user."""
    counts = np.bincount(user, minlength=n_users)
    starts = np.cumsum(counts) - counts
    rank = np.empty(len(user), dtype=np.int64)
    rank[order] = np.arange(len(user), dtype=np.int64) - starts[user[order]]
    nt = n_test[user]
    label = np.full(len(user), TRAIN, dtype=np.int8)
    label[rank < nt] = TEST
    label[(rank >= nt) & (rank < nt + n_valid[user])] = VALID
    return label


def random_split(edges: Edges, n_users: int, cfg: SplitConfig) -> np.ndarray:
    """Per user: shuffle (seeded) and hold out the first n_test then n_valid rows."""
    rng = np.random.default_rng(cfg.seed)
    shuffle = rng.integers(0, 1 << 31, size=len(edges), dtype=np.int64)
    order = np.argsort((edges.user.astype(np.int64) << 31) | shuffle, kind="stable")  # by user, then random
    counts = np.bincount(edges.user, minlength=n_users)
    n_test, n_valid = _holdout_counts(counts, cfg.test_fraction, cfg.valid_fraction)
    return _rank_labels(edges.user, order, n_users, n_test, n_valid)


def valid_from_train(edges: Edges, label: np.ndarray, n_users: int, cfg: SplitConfig, where: str) -> np.ndarray:
    """A split given by the data (a split column, a LightGCN folder) with no validation rows:
    hold out ``valid_fraction`` of each user's training rows (seeded, same rounding as
    ``random``; every user keeps >= 1 training row), so the test rows stay the benchmark's."""
    if (label == VALID).any():
        raise GnaqInputError(f"{where}: the split already has validation rows; split.valid_fraction "
                             f"({cfg.valid_fraction}) would carve a second set from train")
    train = np.flatnonzero(label == TRAIN)
    users = edges.user[train].astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    shuffle = rng.integers(0, 1 << 31, size=train.size, dtype=np.int64)
    order = np.argsort((users << 31) | shuffle, kind="stable")  # by user, then random
    counts = np.bincount(users, minlength=n_users)
    _, n_valid = _holdout_counts(counts, 0.0, cfg.valid_fraction)
    out = label.copy()
    out[train] = _rank_labels(users, order, n_users, np.zeros_like(n_valid), n_valid)
    return out


def _require_time(edges: Edges, strategy: str, where: str) -> np.ndarray:
    ts = edges.timestamp
    if ts is None:
        raise GnaqInputError(f"{where}: split {strategy!r} needs a timestamp column")
    missing = int((ts == TS_NULL).sum())
    if missing:
        raise GnaqInputError(f"{where}: {missing} rows have a null timestamp; split {strategy!r} needs one on every row")
    return ts


def temporal_user_split(edges: Edges, n_users: int, cfg: SplitConfig, where: str) -> np.ndarray:
    """Per user: the latest rows go to test (last n or last fraction), the ones before to valid."""
    ts = _require_time(edges, "temporal_user", where)
    pos = np.arange(len(edges), dtype=np.int64)
    order = np.lexsort((-pos, -ts, edges.user))  # newest first; equal times: later row first
    counts = np.bincount(edges.user, minlength=n_users)
    n_test, n_valid = _holdout_counts(counts, cfg.test_fraction, cfg.valid_fraction, cfg.test_last_n, cfg.valid_last_n)
    return _rank_labels(edges.user, order, n_users, n_test, n_valid)


def temporal_global_split(edges: Edges, cfg: SplitConfig, where: str) -> np.ndarray:
    """One cutoff for everyone: at/after cutoff = test, [valid_cutoff, cutoff) = valid."""
    ts = _require_time(edges, "temporal_global", where)
    label = np.full(len(edges), TRAIN, dtype=np.int8)
    if cfg.valid_cutoff_s is not None:
        label[ts >= cfg.valid_cutoff_s] = VALID
    label[ts >= cfg.cutoff_s] = TEST
    return label


def assign_split(edges: Edges, n_users: int, cfg: SplitConfig, where: str, require_test: bool = True,
                 require_train: bool = True) -> np.ndarray:
    """Labels for ``edges`` by ``cfg.strategy``; error if no row ends up in test, or none in
    train (a model trained on nothing would still report metrics)."""
    if cfg.strategy == "column":
        assert edges.label is not None
        label = edges.label
    elif cfg.strategy == "random":
        label = random_split(edges, n_users, cfg)
    elif cfg.strategy == "temporal_user":
        label = temporal_user_split(edges, n_users, cfg, where)
    else:
        label = temporal_global_split(edges, cfg, where)
    if require_test and not (label == TEST).any():
        hint = {
            "random": "every user has fewer than 2 interactions, or test_fraction is 0",
            "temporal_user": "every user has fewer than 2 interactions, or test_fraction/test_last_n is 0",
            "temporal_global": f"no timestamp is at or after cutoff {cfg.cutoff!r}",
            "column": f"no row has the label {cfg.test_value!r}",
        }[cfg.strategy]
        raise GnaqInputError(f"{where}: split {cfg.strategy!r} leaves no test data ({hint})")
    if require_train and not (label == TRAIN).any():
        first = cfg.valid_cutoff if cfg.valid_cutoff is not None else cfg.cutoff
        hint = {
            "column": f"no row has the label {cfg.train_value!r}",
            "temporal_global": f"every timestamp is at or after {first!r}",
        }.get(cfg.strategy, "every row was held out")
        raise GnaqInputError(f"{where}: split {cfg.strategy!r} leaves no training data ({hint})")
    return label
