"""Raw id -> contiguous index maps, built per record batch.

Per batch only the batch's distinct ids touch Python (``pc.unique`` + a dict lookup);
the whole column is then mapped vectorised (``pc.index_in`` + numpy take), so cost
grows with distinct ids, not with rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class IdMap:
    """Dict raw -> index in order of first appearance; ``kind`` is "string" or "int"."""

    def __init__(self, kind: str | None = None, raw_ids: list | None = None) -> None:
        self.kind = kind
        self.index: dict = {}
        for raw in raw_ids or []:
            self.index.setdefault(raw, len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def map(self, arr: pa.Array) -> np.ndarray:
        """Map a null-free array of raw ids (string or int64) to int64 indices, adding new ids."""
        uniq = pc.unique(arr)
        index = self.index
        values = uniq.to_pylist()
        codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
        pos = pc.index_in(arr, value_set=uniq).to_numpy(zero_copy_only=False)
        return codes[pos]

    def raw_array(self, order: np.ndarray | None = None) -> pa.Array:
        """Raw ids by index (optionally re-ordered: ``order[j]`` = old index of new index j)."""
        values = list(self.index)
        typ = pa.string() if self.kind != "int" else pa.int64()
        arr = pa.array(values, type=typ) if values else pa.array([], type=typ)
        return arr if order is None else arr.take(pa.array(order))

    @staticmethod
    def to_table(raw: pa.Array) -> pa.Table:
        return pa.table({"index": pa.array(np.arange(len(raw), dtype=np.int32)), "raw_id": raw})


def compact(idx: np.ndarray, n: int, n_fixed: int = 0, by: str = "appearance") -> tuple[np.ndarray, np.ndarray]:
    """Re-index to contiguous ids after rows were dropped.

    Indices ``< n_fixed`` (an existing dataset's) keep their value; the others that still
    occur get ``n_fixed, n_fixed+1, ...`` in order of first appearance in ``idx``
    (``by="appearance"``) or of their current index (``by="index"``).
    Returns (new idx, order) where ``order[j]`` is the old index of new index ``j``.
    """
    present = np.zeros(n, dtype=bool)
    present[idx] = True
    present[:n_fixed] = True
    if by == "appearance":
        new_ids = idx[idx >= n_fixed]
        uniq, first = np.unique(new_ids, return_index=True)
        extra = uniq[np.argsort(first, kind="stable")]
    else:
        extra = np.flatnonzero(present[n_fixed:]) + n_fixed
    order = np.concatenate([np.arange(n_fixed, dtype=np.int64), extra.astype(np.int64)])
    remap = np.full(n, -1, dtype=np.int64)
    remap[order] = np.arange(len(order), dtype=np.int64)
    return remap[idx], order
