"""Mini-batch sampling: BPR triples over the train edges, and neighbour blocks for seeds.

``BPRBatches`` draws negatives uniformly from the items a user has NOT interacted with,
exactly and vectorised (a rank among the user's non-train items, mapped to an item id
with one ``searchsorted``), so no rejection loop and no "accept a positive after k tries".
``NeighborBlockSampler`` builds DGL message-flow graphs whose edge weights make the
sampled LightGCN aggregation unbiased (see :mod:`gnaq_dist.propagation`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from gnaq_dist._dgl import dgl
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, TrainCSR
from gnaq_dist.keyed import KeyedPermutation, derive_key, uniform_below
from gnaq_dist.propagation import attach_block_weights


class BPRBatch(NamedTuple):
    users: torch.Tensor  # int64 (B,)
    pos: torch.Tensor  # int64 (B,), item ids (0-based, not node ids)
    neg: torch.Tensor  # int64 (B, num_negatives), item ids


class NegativeSampler:
    """Uniform negatives from each user's non-train items, exact and vectorised.

    For a user with sorted train items ``r_0 < r_1 < ...``, ``a_k = r_k - k`` counts the
    non-train items below ``r_k``; the ``t``-th non-train item is ``t + #{k : a_k <= t}``.
    Stored with the offset ``u * n_items``, all ``a`` form one sorted array, so a batch
    needs one ``searchsorted``. Users who interacted with every item have no negative;
    they get a uniform item (documented, not an error).
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, n_items: int) -> None:
        self.n_items = int(n_items)
        self.indptr = np.asarray(indptr, dtype=np.int64)
        deg = np.diff(self.indptr)
        rows = np.repeat(np.arange(deg.shape[0], dtype=np.int64), deg)
        rank_in_row = np.arange(indices.shape[0], dtype=np.int64) - self.indptr[rows]
        gaps = np.asarray(indices, dtype=np.int64) - rank_in_row  # a_k, ascending within each row
        del rows, rank_in_row
        # a_k <= n_items: 4 bytes an edge where item ids fit (the rank's own edges, kept all run)
        self._gaps = gaps.astype(np.int32) if self.n_items < 2**31 else gaps
        self._room = self.n_items - deg  # number of non-train items per user
        self._adjusted: np.ndarray | None = None  # the one sorted array of the search without numba

    def sample(self, users: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
        """``(len(users), num)`` negative item ids."""
        users = np.asarray(users, dtype=np.int64)
        room = self._room[users][:, None]
        t = rng.integers(0, np.maximum(room, 1), size=(users.shape[0], num), dtype=np.int64)
        neg = self._item_of_rank(users, t)
        full = room[:, 0] <= 0
        if full.any():
            neg[full] = rng.integers(0, self.n_items, size=(int(full.sum()), num))
        return neg

    def sample_keyed(self, users: np.ndarray, num: int, key: int | np.uint64, positions: np.ndarray) -> np.ndarray:
        """Like :meth:`sample`, but negative ``k`` of the positive at global ``positions[i]``
        is a pure function of ``(key, positions[i], k)``: any rank draws it alike."""
        users = np.asarray(users, dtype=np.int64)
        counters = np.asarray(positions, dtype=np.int64)[:, None] * num + np.arange(num, dtype=np.int64)
        room = self._room[users][:, None]
        neg = self._item_of_rank(users, uniform_below(key, counters, np.maximum(room, 1)))
        full = room[:, 0] <= 0
        if full.any():
            neg[full] = uniform_below(key, counters[full], np.full((int(full.sum()), num), self.n_items))
        return neg

    def _item_of_rank(self, users: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The ``t``-th non-train item of each user (rows of ``t`` per user).

        numba searches each user's own row (a few entries, close in memory); without it,
        one ``searchsorted`` over all rows offset by ``u * n_items`` (a cache miss a query)."""
        kernel = _rank_kernel()
        t = np.ascontiguousarray(t, dtype=np.int64)
        if kernel is not None:
            out = np.empty_like(t)
            kernel(self.indptr, self._gaps, np.ascontiguousarray(users, dtype=np.int64), t, out)
            return out
        if self._adjusted is None:
            rows = np.repeat(np.arange(self._room.shape[0], dtype=np.int64), np.diff(self.indptr))
            self._adjusted = rows * self.n_items + self._gaps
        below = np.searchsorted(self._adjusted, users[:, None] * self.n_items + t, side="right")
        return t + below - self.indptr[users][:, None]


def _at_most(numba):
    """``at_most(a, lo, hi, v)``: how many of ascending ``a[lo:hi]`` are ``<= v`` (a binary
    search, inlined into the kernels that call it)."""
    @numba.njit(inline="always")
    def at_most(a, lo, hi, v):  # pragma: no cover - compiled
        start = lo
        while lo < hi:
            mid = (lo + hi) >> 1
            if a[mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        return lo - start
    return at_most


@functools.lru_cache(maxsize=None)
def _rank_kernel():
    """numba's per-row search for :meth:`NegativeSampler._item_of_rank`, or None."""
    def build(numba, cache):
        at_most = _at_most(numba)

        @numba.njit(nogil=True, boundscheck=False, cache=cache)
        def item_of_rank(indptr, gaps, users, t, out):  # pragma: no cover - compiled
            n, k = t.shape
            for i in range(n):
                start, end = indptr[users[i]], indptr[users[i] + 1]
                for c in range(k):  # the t-th non-train item: t plus the row's a_k <= t
                    out[i, c] = t[i, c] + at_most(gaps, start, end, t[i, c])
        return item_of_rank

    from gnaq_dist.quant.dequant_kernels import compile_with_numba

    return compile_with_numba(build, "the negative sampler's search")


@functools.lru_cache(maxsize=None)
def _owned_slice_kernels():
    """numba's :meth:`OwnedBPRBatches._slice`: ``permute`` (the keyed permutation of
    consecutive positions: Feistel rounds of splitmix64, cycle walking) and ``walk`` (over
    edges in ascending order: the user, the rank's filter, the item and the keyed negatives),
    bit for bit the numpy path's draws; or None."""
    def build(numba, cache):
        u64 = np.uint64
        golden, m1, m2 = u64(0x9E3779B97F4A7C15), u64(0xBF58476D1CE4E5B9), u64(0x94D049BB133111EB)
        s30, s27, s31, s11 = u64(30), u64(27), u64(31), u64(11)
        at_most = _at_most(numba)

        @numba.njit(inline="always")
        def mix(x):  # pragma: no cover - compiled; keyed.splitmix64 of one value
            z = x + golden
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            return z ^ (z >> s31)

        @numba.njit(nogil=True, boundscheck=False, cache=cache)
        def permute(start, n, half, mask, keys, out):  # pragma: no cover - compiled
            for i in range(out.shape[0]):
                x = u64(start + i)
                while True:  # Feistel rounds, walked until the value lands in [0, n)
                    left, right = x >> half, x & mask
                    for k in keys:
                        left, right = right, left ^ (mix(right ^ k) & mask)
                    x = (left << half) | right
                    if x < n:
                        break
                out[i] = np.int64(x)

        @numba.njit(nogil=True, boundscheck=False, cache=cache)
        def walk(edges, positions, all_indptr, own_users, own_indptr, own_indices, room, gaps, num, neg_key,
                 n_items, out_users, out_items, out_neg):  # pragma: no cover - compiled
            count = 0
            scale = 1.0 / 9007199254740992.0  # 2^-53
            m = edges.shape[0]
            if m == 0:
                return 0
            u = at_most(all_indptr, 0, all_indptr.shape[0], edges[0]) - 1  # the first edge's user
            for i in range(m):
                e = edges[i]
                while all_indptr[u + 1] <= e:  # edges ascend: the user only moves forwards
                    u += 1
                if not own_users[u]:
                    continue
                out_users[count] = u
                out_items[count] = own_indices[own_indptr[u] + e - all_indptr[u]]
                r = room[u]
                row_start, row_end = own_indptr[u], own_indptr[u + 1]
                p = positions[i]
                for c in range(num):
                    h = mix(u64(p * num + c) ^ neg_key)
                    f = np.float64(h >> s11) * scale
                    if r <= 0:  # no non-train item: a uniform one
                        out_neg[count, c] = min(np.int64(f * n_items), max(n_items - 1, 0))
                        continue
                    t = min(np.int64(f * r), r - 1)
                    out_neg[count, c] = t + at_most(gaps, row_start, row_end, t)
                count += 1
            return count
        return permute, walk

    from gnaq_dist.quant.dequant_kernels import compile_with_numba

    return compile_with_numba(build, "the owned batches' draw")


class BPRBatches:
    """One epoch of shuffled ``(user, pos, neg)`` batches over the deduplicated train edges.

    Deterministic for ``(seed, epoch)``: iterate after :meth:`set_epoch` to get another
    epoch's order. ``edges`` restricts the positives (e.g. to a worker's shard); the
    train CSR of ``graph`` still defines what counts as a negative.
    """

    def __init__(
        self,
        graph: BipartiteGraph | TrainCSR,
        batch_size: int,
        num_negatives: int = 1,
        seed: int = 0,
        drop_last: bool = False,
        edges: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise GnaqInputError(f"batch_size must be positive, got {batch_size}")
        if num_negatives <= 0:
            raise GnaqInputError(f"num_negatives must be positive, got {num_negatives}")
        indptr, indices = graph.train_csr()
        if edges is None:  # user ids in 4 bytes where they fit: this array is as long as the train set
            ids = np.int32 if graph.n_users < 2**31 else np.int64
            self.users = np.repeat(np.arange(graph.n_users, dtype=ids), np.diff(indptr))
            self.items = indices
        else:
            self.users = np.asarray(edges[0], dtype=np.int64)
            self.items = np.asarray(edges[1], dtype=np.int64)
            if self.users.shape != self.items.shape:
                raise GnaqInputError("edges: users and items differ in length")
        self.negatives = NegativeSampler(indptr, indices, graph.n_items)
        self.batch_size = int(batch_size)
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.users.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[BPRBatch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        # The same order as rng.permutation(n), held in 4 bytes a pair for the whole epoch.
        order = np.arange(self.users.shape[0], dtype=np.int32 if self.users.shape[0] < 2**31 else np.int64)
        rng.shuffle(order)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            users = self.users[idx].astype(np.int64)
            neg = self.negatives.sample(users, self.num_negatives, rng)
            yield BPRBatch(torch.from_numpy(users), torch.from_numpy(self.items[idx]), torch.from_numpy(neg))


class OwnedBatch(NamedTuple):
    users: torch.Tensor  # int64 (b,), this rank's share of the batch's positives
    pos: torch.Tensor  # int64 (b,), item ids
    neg: torch.Tensor  # int32 (b, num_negatives), item ids: the batch's largest array, at half the bytes
    global_size: int  # positives in the whole batch, every rank's (the loss is normalised by it)


class OwnedBPRBatches:
    """The epoch's global BPR batches, of which each rank takes the positives of its own users.

    Why not :class:`BPRBatches` and a filter: that holds every train edge, a user per edge
    and a shuffled index on every rank (at the scale benchmark's full size about 1 GB a
    rank beyond its shard), and draws the whole batch's negatives on every rank. Here the
    epoch's order is a :class:`~gnaq_dist.keyed.KeyedPermutation` of the global edge ids
    (user-major CSR order), and a positive's negatives are keyed by its position in the
    epoch. A rank needs every user's edge count (``all_indptr``, 8 bytes a user) and the
    items of its own users only (``own``: a global-size indptr whose other rows may be
    empty). Every W sees the same global batches, so W = 1 and W = 2 train alike.
    """

    def __init__(self, all_indptr: np.ndarray, own: TrainCSR, own_users: np.ndarray, batch_size: int,
                 num_negatives: int = 1, seed: int = 0) -> None:
        if batch_size <= 0:
            raise GnaqInputError(f"batch_size must be positive, got {batch_size}")
        if num_negatives <= 0:
            raise GnaqInputError(f"num_negatives must be positive, got {num_negatives}")
        self.all_indptr = np.asarray(all_indptr, dtype=np.int64)
        self.own_users = np.asarray(own_users, dtype=bool)
        if self.all_indptr.shape != (own.n_users + 1,) or self.own_users.shape != (own.n_users,):
            raise GnaqInputError(f"all_indptr and own_users must cover the {own.n_users} users")
        self.own_indptr, self.own_indices = own.train_csr()
        all_deg, own_deg = np.diff(self.all_indptr), np.diff(self.own_indptr)
        if not np.array_equal(own_deg[self.own_users], all_deg[self.own_users]):
            raise GnaqInputError("own: an owned user's items differ in number from all_indptr's")
        self.negatives = NegativeSampler(self.own_indptr, self.own_indices, own.n_items)
        self.n_edges = int(self.all_indptr[-1])
        self.batch_size = int(batch_size)
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n_edges // self.batch_size)

    #: Global positions drawn at a time: a batch of millions is made in slices, so its transients
    #: (the permutation's, the keyed negatives') follow the slice and only the kept positives stay.
    SLICE = 1 << 20

    def __iter__(self) -> Iterator[OwnedBatch]:
        order = KeyedPermutation(self.n_edges, derive_key(self.seed, self.epoch, 1))
        neg_key = derive_key(self.seed, self.epoch, 2)
        for b in range(len(self)):
            start, end = b * self.batch_size, min((b + 1) * self.batch_size, self.n_edges)
            # Room for every position; only the rows this rank keeps are ever written, so only
            # they become resident: no concatenation of slices, no second copy of the batch.
            users, items = np.empty(end - start, dtype=np.int64), np.empty(end - start, dtype=np.int64)
            neg = np.empty((end - start, self.num_negatives), dtype=np.int32)
            got = 0
            for lo in range(start, end, self.SLICE):
                got += self._slice(order, neg_key, lo, min(lo + self.SLICE, end), users[got:], items[got:], neg[got:])
            yield OwnedBatch(torch.from_numpy(users[:got]), torch.from_numpy(items[:got]),
                             torch.from_numpy(neg[:got]), end - start)

    def _slice(self, order: KeyedPermutation, neg_key, start: int, end: int, users: np.ndarray,
               items: np.ndarray, neg: np.ndarray) -> int:
        """This rank's positives among global positions ``[start, end)``, written to the heads of
        ``users``, ``items``, ``neg`` in train-edge order (user-major) within the slice; returns
        how many.

        Why that order: the lookups (the user's row, its items, its negatives' search) and the
        step's reads of the users' rows then walk memory forwards instead of at random; which
        positives a batch holds, and each one's negatives, do not depend on it. numba does the
        walk in one pass (:func:`_owned_slice_kernels`); numpy in whole-slice passes, the same draws."""
        positions = np.arange(start, end, dtype=np.int64)
        kernels = _owned_slice_kernels()
        if kernels is not None:
            permute, walk = kernels
            edges = np.empty_like(positions)
            permute(start, np.uint64(order.n), order._half, order._mask, order._keys, edges)
        else:
            edges = order(positions)
        by_edge = np.argsort(edges)
        edges, positions = edges[by_edge], positions[by_edge]
        del by_edge
        if kernels is not None:
            return int(walk(edges, positions, self.all_indptr, self.own_users, self.own_indptr, self.own_indices,
                            self.negatives._room, self.negatives._gaps, self.num_negatives, np.uint64(neg_key),
                            self.negatives.n_items, users, items, neg))
        mine_users = np.searchsorted(self.all_indptr, edges, side="right") - 1
        mine = self.own_users[mine_users]
        mine_users, edges, positions = mine_users[mine], edges[mine], positions[mine]
        got = mine_users.shape[0]
        users[:got] = mine_users
        items[:got] = self.own_indices[self.own_indptr[mine_users] + edges - self.all_indptr[mine_users]]
        neg[:got] = self.negatives.sample_keyed(mine_users, self.num_negatives, neg_key, positions)
        return got


class NeighborBlockSampler:
    """Layer-wise neighbour sampling into DGL blocks, weighted for unbiased propagation.

    ``fanouts[l]`` is the number of in-neighbours sampled (without replacement) per node
    for the block of layer ``l`` (``blocks[0]`` reads the input nodes); ``-1`` takes all.
    Randomness is DGL's: call ``dgl.seed`` for a reproducible draw.
    """

    def __init__(self, graph: BipartiteGraph, fanouts: Sequence[int], num_layers: int | None = None) -> None:
        fanouts = [int(f) for f in fanouts]
        if num_layers is not None and len(fanouts) != num_layers:
            raise GnaqInputError(f"fanouts has {len(fanouts)} entries for {num_layers} layers")
        if not fanouts or any(f == 0 or f < -1 for f in fanouts):
            raise GnaqInputError(f"fanouts must be a non-empty list of positive ints or -1, got {fanouts}")
        self.graph = graph
        self.fanouts = fanouts

    @property
    def num_layers(self) -> int:
        return len(self.fanouts)

    def sample(self, seed_nodes: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``(input_nodes, blocks)``: ``blocks[-1]``'s dst nodes are ``seed_nodes`` in order."""
        seeds = torch.as_tensor(seed_nodes, dtype=torch.int64)
        if seeds.dim() != 1 or (seeds.numel() and (seeds.min() < 0 or seeds.max() >= self.graph.n_nodes)):
            raise GnaqInputError(f"seed_nodes must be 1-D node ids in [0, {self.graph.n_nodes})")
        if torch.unique(seeds).numel() != seeds.numel():
            raise GnaqInputError("seed_nodes must not repeat")
        g = self.graph.dgl_graph()
        blocks = []
        for fanout in reversed(self.fanouts):
            frontier = dgl.sampling.sample_neighbors(g, seeds, fanout, replace=False)
            block = dgl.to_block(frontier, dst_nodes=seeds)
            # to_block numbers edges by the frontier; map back to ids of the full graph.
            block.edata[dgl.EID] = frontier.edata[dgl.EID][block.edata[dgl.EID]]
            seeds = block.srcdata[dgl.NID]
            blocks.insert(0, block)
        attach_block_weights(self.graph, blocks)
        return seeds, blocks


__all__ = ["BPRBatch", "BPRBatches", "NegativeSampler", "NeighborBlockSampler", "OwnedBPRBatches", "OwnedBatch"]
