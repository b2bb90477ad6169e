"""The in-memory interaction arrays that flow between ingest stages.

Only compact numpy columns of kept rows (int32/int64/float32/int8), so memory grows
with kept edges, never with the raw file size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TS_NULL = np.iinfo(np.int64).min  # sentinel for a missing timestamp
#: The unix seconds a timestamp may hold: 0001-01-01 .. 9999-12-31 23:59:59 UTC (what
#: datetime and an ISO cutoff can name); ingest refuses others, TS_NULL as a value included.
TS_MIN, TS_MAX = -62_135_596_800, 253_402_300_799
TRAIN, TEST, VALID = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", TEST: "test", VALID: "valid"}


@dataclass
class Edges:
    user: np.ndarray  # int32 indices into the user map
    item: np.ndarray  # int32 indices into the item map
    timestamp: np.ndarray | None = None  # int64 unix seconds, TS_NULL where missing
    weight: np.ndarray | None = None  # float32
    label: np.ndarray | None = None  # int8 TRAIN/TEST/VALID (known before splitting)

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, rows: np.ndarray) -> "Edges":
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return Edges(self.user[rows], self.item[rows], pick(self.timestamp), pick(self.weight), pick(self.label))

    @staticmethod
    def concat(parts: list["Edges"]) -> "Edges":
        def cat(name: str, dtype) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            if all(a is None for a in arrays):
                return None
            if name == "timestamp":
                arrays = [np.full(len(p), TS_NULL, np.int64) if a is None else a for p, a in zip(parts, arrays)]
            return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

        if not parts:
            return Edges(np.zeros(0, np.int32), np.zeros(0, np.int32))
        return Edges(
            cat("user", np.int32), cat("item", np.int32), cat("timestamp", np.int64),
            cat("weight", np.float32), cat("label", np.int8),
        )
