"""Keyed randomness that any process computes alike, at any position, without shared state.

Why: W ranks must agree on the epoch's order of the train edges and on each positive's
negatives (so that W = 1 and W = 2 train the same model), but a rank should hold only its
own edges. A shuffled index array (4 bytes per edge on every rank) or one random stream
over the whole batch would need the whole edge set everywhere. Here the order is a keyed
bijection of ``[0, n)`` evaluated only where needed, and every draw is a hash of its
position: each rank computes its part of the global batch, bit for bit the same as any
other number of ranks would.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mixer (splitmix64's finaliser): the same on every platform and numpy version."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def derive_key(*parts: int) -> np.uint64:
    """One 64-bit key from integers (seed, epoch, purpose...), order-sensitive."""
    key = np.uint64(0)
    for p in parts:
        key = splitmix64(np.array([key ^ np.uint64(int(p) & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
    return key


class KeyedPermutation:
    """A pseudo-random bijection of ``[0, n)`` chosen by ``key``, evaluated pointwise.

    A balanced Feistel network on the smallest even number of bits covering ``n`` (so its
    domain is below ``4n``), with splitmix64 round functions, made a permutation of
    ``[0, n)`` by cycle walking (apply again while the value is ``>= n``; about 1.5 rounds
    on average). Memory: none per element.
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int | np.uint64) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = int(n)
        half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self._half = np.uint64(half)
        self._mask = np.uint64((1 << half) - 1)
        base = np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF)
        self._keys = splitmix64(base ^ np.arange(1, self.ROUNDS + 1, dtype=np.uint64))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (splitmix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images (int64) of ``positions`` (integers in ``[0, n)``)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise ValueError(f"positions must lie in [0, {self.n})")
        out = self._feistel(pos.astype(np.uint64))
        n = np.uint64(self.n)
        walk = np.flatnonzero(out >= n)
        while walk.size:
            out[walk] = self._feistel(out[walk])
            walk = walk[out[walk] >= n]
        return out.astype(np.int64)


def uniform_below(key: int | np.uint64, counters: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """A uniform integer in ``[0, bound)`` per counter (int64), a pure function of (key, counter).

    53 random bits scaled by ``bound``: the bias is below ``bound / 2**53``.
    """
    h = splitmix64(np.asarray(counters).astype(np.uint64) ^ np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF))
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.minimum((u * np.asarray(bound, dtype=np.float64)).astype(np.int64),
                      np.maximum(np.asarray(bound, dtype=np.int64) - 1, 0))


__all__ = ["KeyedPermutation", "derive_key", "splitmix64", "uniform_below"]
