"""Mini-batch sampling: BPR triples over the train edges, and neighbour blocks for seeds.

``BPRBatches`` draws negatives uniformly from the items a user has NOT interacted with,
exactly and vectorised (a rank among the user's non-train items, mapped to an item id
with one ``searchsorted``), so no rejection loop and no "accept a positive after k tries".
``NeighborBlockSampler`` builds DGL message-flow graphs whose edge weights make the
sampled LightGCN aggregation unbiased (see :mod:`gnaq_dist.propagation`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from gnaq_dist._dgl import dgl
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, TrainCSR
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
        self._adjusted = rows * self.n_items + np.asarray(indices, dtype=np.int64) - rank_in_row
        self._room = self.n_items - deg  # number of non-train items per user

    def sample(self, users: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
        """``(len(users), num)`` negative item ids."""
        users = np.asarray(users, dtype=np.int64)
        room = self._room[users][:, None]
        t = rng.integers(0, np.maximum(room, 1), size=(users.shape[0], num), dtype=np.int64)
        below = np.searchsorted(self._adjusted, users[:, None] * self.n_items + t, side="right")
        neg = t + below - self.indptr[users][:, None]
        full = room[:, 0] <= 0
        if full.any():
            neg[full] = rng.integers(0, self.n_items, size=(int(full.sum()), num))
        return neg


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


__all__ = ["BPRBatch", "BPRBatches", "NegativeSampler", "NeighborBlockSampler"]
