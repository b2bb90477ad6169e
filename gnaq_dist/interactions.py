"""The in-memory form of an ingested dataset that training and evaluation read.

Kept apart from ``gnaq_dist.ingest`` (which writes datasets) so that the method code
depends on a small, stable structure, not on how logs were read.
Users are ``0..n_users-1`` and items ``0..n_items-1`` (the contiguous indices of the
dataset's id maps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gnaq_dist.errors import GnaqInputError


def unique_pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """The sorted, distinct keys ``user * n_items + item`` of (user, item) pairs.

    A sort in place and a mask, not ``np.unique``: NumPy 2's hash-based unique is the slower
    of the two on the millions of pairs of a worker's setup."""
    keys = np.asarray(users, dtype=np.int64) * np.int64(n_items) + np.asarray(items, dtype=np.int64)
    keys.sort()
    if keys.size > 1:
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return keys


@dataclass
class InteractionData:
    n_users: int
    n_items: int
    train_user: np.ndarray  # int64 (E_train,)
    train_item: np.ndarray  # int64 (E_train,)
    test_user: np.ndarray  # int64 (E_test,)
    test_item: np.ndarray  # int64 (E_test,)
    valid_user: np.ndarray | None = None
    valid_item: np.ndarray | None = None
    fingerprint: str = ""  # the dataset manifest's fingerprint ("" for in-memory data)
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train_user", "train_item", "test_user", "test_item", "valid_user", "valid_item"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.ascontiguousarray(value, dtype=np.int64))

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    @property
    def n_train(self) -> int:
        return int(self.train_user.shape[0])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name == "train":
            return self.train_user, self.train_item
        if name == "test":
            return self.test_user, self.test_item
        if name == "valid":
            if self.valid_user is None:  # the CLI's one-line error (exit 2), before any training
                raise GnaqInputError(f"{self.name or 'this dataset'}: no validation split "
                                     "(eval.split=valid needs one: ingest with e.g. --valid-fraction 0.1)")
            return self.valid_user, self.valid_item
        raise ValueError(f"unknown split {name!r}")
