"""Which worker owns which embedding row: the node partition of the user-item graph.

Why a module of its own: every rank must agree, bit for bit, on the owner of each row,
and a checkpoint must record it (``describe()``'s checksum). This module is the record
and the ways to compute it; it sends nothing (:func:`.comm.broadcast_partition` does).
Nodes are global ids (users ``0..n_users-1``, items after them, as in
:class:`~gnaq_dist.graph.BipartiteGraph`); a rank's shard holds its owned rows sorted by
global id, so ``local_index`` is the position of a node in ``owned_ids(owner)``.

Two methods:

* ``"metis"``: DGL's ``metis_partition_assignment`` on the symmetric graph, with users
  and items balanced separately (``balance_ntypes``), which keeps most user-item
  edges inside a partition, so fewer rows cross the wire. METIS as DGL 2.1.0 calls it
  takes no seed and is **not repeatable** (different assignments for
  3 parts from one process to the next). So partition on one rank, broadcast it
  (:func:`.comm.broadcast_partition`), and store it with the checkpoint. METIS balances node
  counts; :func:`balance_loads` then moves boundary nodes until the ranks' modelled costs of
  a full-graph step (non-zeros, rows, halo: :class:`RankLoad`) agree, since every halo
  exchange waits for the slowest rank.
* ``"hash"``: a keyed hash (splitmix64 of ``id ^ seed``) orders the users and the items;
  they are dealt round-robin, so every rank owns ``n/W`` users and items, +-1, and the
  same seed gives the same partition everywhere. It is the fallback when METIS is
  unavailable, fails, or returns an unusable (empty-part) assignment.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, TrainCSR
from gnaq_dist.keyed import splitmix64

log = logging.getLogger(__name__)

PARTITION_METHODS = ("metis", "hash")


@dataclass(eq=False)
class Partition:
    """Owner and local row of every global node id, for ``world_size`` ranks."""

    world_size: int
    n_users: int
    n_items: int
    owner: np.ndarray  # int32 (N,), rank owning each global node id
    local_index: np.ndarray  # int64 (N,), the node's row in its owner's shard
    method: str = "hash"

    def __post_init__(self) -> None:
        n = self.n_users + self.n_items
        self.owner = np.ascontiguousarray(self.owner, dtype=np.int32)
        if self.world_size < 1:
            raise GnaqInputError(f"world_size must be >= 1, got {self.world_size}")
        if self.owner.shape != (n,):
            raise GnaqInputError(f"owner must have one entry per node ({n}), got shape {self.owner.shape}")
        if n and (self.owner.min() < 0 or self.owner.max() >= self.world_size):
            raise GnaqInputError(f"owner ranks must lie in [0, {self.world_size}), got "
                                 f"[{self.owner.min()}, {self.owner.max()}]")
        self.local_index = np.ascontiguousarray(self.local_index, dtype=np.int64)
        self._owner_t = torch.from_numpy(self.owner.astype(np.int64))
        self._local_t = torch.from_numpy(self.local_index)

    @classmethod
    def from_owner(cls, owner: np.ndarray, world_size: int, n_users: int, n_items: int,
                   method: str = "hash") -> Partition:
        """Build the local rows from an owner array (rows sorted by global id per rank)."""
        owner = np.asarray(owner, dtype=np.int32)
        order = np.argsort(owner, kind="stable")  # by owner, then by global id
        counts = np.bincount(owner, minlength=world_size) if owner.size else np.zeros(world_size, np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        local = np.empty(owner.shape[0], dtype=np.int64)
        local[order] = np.arange(owner.shape[0], dtype=np.int64) - np.repeat(starts, counts)
        return cls(world_size=int(world_size), n_users=int(n_users), n_items=int(n_items),
                   owner=owner, local_index=local, method=method)

    @property
    def num_nodes(self) -> int:
        return self.n_users + self.n_items

    def owner_of(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 owner rank of each global id (CPU tensor in, CPU tensor out)."""
        return self._owner_t[ids]

    def local_of(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 row in the owner's shard of each global id."""
        return self._local_t[ids]

    def owned_ids(self, rank: int) -> np.ndarray:
        """Sorted global ids that ``rank`` owns (row ``i`` of its shard is ``owned_ids[i]``)."""
        self._check_rank(rank)
        return np.flatnonzero(self.owner == rank).astype(np.int64)

    def counts(self) -> np.ndarray:
        """Rows per rank, (world_size,)."""
        return np.bincount(self.owner, minlength=self.world_size).astype(np.int64)

    def user_counts(self) -> np.ndarray:
        return np.bincount(self.owner[: self.n_users], minlength=self.world_size).astype(np.int64)

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.owner[self.n_users:], minlength=self.world_size).astype(np.int64)

    def checksum(self) -> str:
        """sha256 (16 hex digits) of the owner array and the sizes: equal on every rank or a bug."""
        h = hashlib.sha256()
        h.update(np.array([self.world_size, self.n_users, self.n_items], dtype=np.int64).tobytes())
        h.update(self.owner.tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """What a manifest records about the partition."""
        return {
            "method": self.method,
            "world_size": self.world_size,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "rows_per_rank": self.counts().tolist(),
            "users_per_rank": self.user_counts().tolist(),
            "items_per_rank": self.item_counts().tolist(),
            "owner_checksum": self.checksum(),
        }

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise GnaqInputError(f"rank must lie in [0, {self.world_size}), got {rank}")


def hash_owner(n_users: int, n_items: int, world_size: int, seed: int = 0) -> np.ndarray:
    """Users and items each ordered by a keyed hash and dealt round-robin: balance +-1."""
    owner = np.empty(n_users + n_items, dtype=np.int32)
    salt = splitmix64(np.array([seed], dtype=np.int64))[0]
    for start, n in ((0, n_users), (n_users, n_items)):
        ids = np.arange(start, start + n, dtype=np.int64)
        keys = splitmix64(ids.astype(np.uint64) ^ salt)
        order = np.lexsort((ids, keys))  # ties (never in practice) broken by id
        owner[ids[order]] = np.arange(n, dtype=np.int64) % world_size
    return owner


def _metis_owner(graph: BipartiteGraph, world_size: int, max_imbalance: float) -> np.ndarray:
    from gnaq_dist._dgl import dgl

    g = dgl.graph((graph.src, graph.dst), num_nodes=graph.n_nodes)
    ntype = torch.cat([torch.zeros(graph.n_users, dtype=torch.int64), torch.ones(graph.n_items, dtype=torch.int64)])
    with contextlib.redirect_stdout(io.StringIO()):  # DGL prints timings to stdout
        assignment = dgl.metis_partition_assignment(g, world_size, balance_ntypes=ntype)
    if assignment is None:
        raise RuntimeError("METIS returned no assignment")
    owner = assignment.numpy().astype(np.int32)
    if owner.shape != (graph.n_nodes,):
        raise RuntimeError(f"METIS returned {owner.shape[0]} assignments for {graph.n_nodes} nodes")
    for name, part in (("users", owner[: graph.n_users]), ("items", owner[graph.n_users:])):
        counts = np.bincount(part, minlength=world_size)
        if part.size >= world_size and counts.min() == 0:
            raise RuntimeError(f"METIS left a rank without {name}")
        limit = -(-part.size // world_size) * (1.0 + max_imbalance)
        if counts.max() > limit:
            raise RuntimeError(f"METIS gave a rank {counts.max()} {name}, more than {limit:.1f} "
                               f"(max_imbalance {max_imbalance})")
    return owner


# A rank's share of the full-graph step (forward and backward of L layers), in units of the
# work of one non-zero of A_hat (read by every sparse product): an own row is also gathered
# from its codes, added up at every layer and stepped by Adam; a halo row is gathered and
# scattered (its exchange costs both ranks alike, so it does not unbalance them). Fitted to
# benchmarks/profile_step.py's timings of two partitions of one graph (METIS, and one
# balanced by non-zeros and rows).
ROW_COST = 9.0
HALO_COST = 2.0


@dataclass(frozen=True)
class RankLoad:
    """What a rank computes in the full-graph step under a partition (:func:`rank_loads`)."""

    nonzeros: np.ndarray  # (W,) non-zeros of the rank's rows of A_hat (the degrees of its nodes)
    own: np.ndarray  # (W,) nodes owned
    halo: np.ndarray  # (W,) remote nodes adjacent to an owned node
    cut_edges: int  # train edges whose user and item have different owners

    @property
    def cost(self) -> np.ndarray:
        return self.nonzeros + ROW_COST * self.own + HALO_COST * self.halo

    @property
    def imbalance(self) -> float:
        """Max over mean of :attr:`cost`: the time the others wait for the slowest rank, in parts of a step."""
        c = self.cost
        return float(c.max() / c.mean()) - 1.0 if c.mean() > 0 else 0.0


def rank_loads(owner: np.ndarray, users: np.ndarray, items: np.ndarray, n_users: int, world_size: int) -> RankLoad:
    """Each rank's non-zeros, own and halo nodes for the undirected train edges ``(users, items)``
    (item ids 0-based) under ``owner``."""
    n = owner.shape[0]
    ou, oi = owner[users], owner[n_users + items]
    degree = np.bincount(users, minlength=n_users)
    degree = np.concatenate([degree, np.bincount(items, minlength=n - n_users)])
    nonzeros = np.bincount(owner, weights=degree, minlength=world_size).astype(np.int64)
    own = np.bincount(owner, minlength=world_size).astype(np.int64)
    cut = ou != oi
    # A cut edge puts its item in the halo of the user's owner and its user in the item's owner's.
    keys = np.concatenate([ou[cut].astype(np.int64) * n + n_users + items[cut],
                           oi[cut].astype(np.int64) * n + users[cut]])
    halo = np.bincount(np.unique(keys) // n, minlength=world_size).astype(np.int64)
    return RankLoad(nonzeros, own, halo, int(cut.sum()))


def balance_loads(owner: np.ndarray, users: np.ndarray, items: np.ndarray, n_users: int, world_size: int,
                  tolerance: float = 0.003, max_rounds: int = 8) -> tuple[np.ndarray, RankLoad, RankLoad]:
    """Move boundary nodes from the busiest rank to the idlest until the modelled step costs
    (:class:`RankLoad`) agree within ``tolerance``; returns ``(owner, load before, load after)``.

    Why: METIS balances node counts, but a rank's step grows with its non-zeros and its halo,
    and at every halo exchange the others wait for the slowest. The nodes moved are those with
    the most neighbours already on the receiving rank, so the cut shrinks or grows least; the
    best owner array seen is kept.
    """
    owner = np.array(owner, dtype=np.int32, copy=True)
    n = owner.shape[0]
    users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
    nodes_i = n_users + items
    degree = np.bincount(np.concatenate([users, nodes_i]), minlength=n)
    before = load = rank_loads(owner, users, items, n_users, world_size)
    best, best_owner = load, owner.copy()
    for _ in range(max_rounds):
        if load.imbalance <= tolerance:
            break
        cost = load.cost
        heavy, light = int(cost.argmax()), int(cost.argmin())
        need = (cost[heavy] - cost[light]) / 2.0
        ou, oi = owner[users], owner[nodes_i]
        # Neighbours of each node on the light rank and on its own rank.
        to_light = (np.bincount(users[oi == light], minlength=n) + np.bincount(nodes_i[ou == light], minlength=n))
        at_home = np.bincount(users[(ou == heavy) & (oi == heavy)], minlength=n) + \
            np.bincount(nodes_i[(ou == heavy) & (oi == heavy)], minlength=n)
        cand = np.flatnonzero((owner == heavy) & (to_light > 0))
        if cand.size == 0:
            break
        gain = to_light[cand] - at_home[cand]  # cut edges saved by the move
        cand = cand[np.lexsort((degree[cand], -gain))]  # best gain first, small nodes first among equals
        # A move shifts the node's non-zeros and row; its halo effect is settled by the next round.
        shift = np.cumsum(degree[cand] + ROW_COST)
        take = int(np.searchsorted(shift, need)) + 1
        owner[cand[:take]] = light
        if np.bincount(owner, minlength=world_size).min() == 0:
            break
        load = rank_loads(owner, users, items, n_users, world_size)
        if load.cost.max() < best.cost.max():
            best, best_owner = load, owner.copy()
    return best_owner, before, best


def partition_nodes(graph: BipartiteGraph | TrainCSR, world_size: int, method: str = "metis", seed: int = 0,
                    max_imbalance: float = 0.10) -> Partition:
    """Partition users and items over ``world_size`` ranks (METIS, hash as the fallback).

    Hash partitioning reads only the node counts, so ``graph`` may be a :class:`TrainCSR`;
    METIS needs the :class:`BipartiteGraph` (a ``TrainCSR`` falls back to hash).

    A METIS result that gives a rank more than ``(1 + max_imbalance) * ceil(n / W)``
    users (or items) is rejected for hash partitioning: a straggler costs more than the
    rows a better cut saves. ``seed`` only affects hash partitioning.
    """
    if not max_imbalance >= 0:
        raise GnaqInputError(f"max_imbalance must be >= 0, got {max_imbalance!r}")
    if method not in PARTITION_METHODS:
        raise GnaqInputError(f"partition method must be one of {PARTITION_METHODS}, got {method!r}")
    if not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise GnaqInputError(f"world_size must be a positive integer, got {world_size!r}")
    world_size = int(world_size)
    used = method
    owner: np.ndarray | None = None
    if method == "metis" and world_size > 1:
        try:
            owner = _metis_owner(graph, world_size, max_imbalance)
        except Exception as exc:  # DGL without METIS, a METIS error, an unusable result
            log.warning("METIS partitioning failed (%s: %s); falling back to hash partitioning",
                        type(exc).__name__, exc)
            used = "hash"
        else:
            indptr, items = graph.train_csr()
            users = np.repeat(np.arange(graph.n_users, dtype=np.int64), np.diff(indptr))
            owner, before, after = balance_loads(owner, users, items, graph.n_users, world_size)
            log.info("balanced the modelled step cost per rank: imbalance %.1f%% -> %.1f%%, halos %s -> %s, "
                     "non-zeros %s -> %s, cut edges %d -> %d", 100 * before.imbalance, 100 * after.imbalance,
                     before.halo.tolist(), after.halo.tolist(), before.nonzeros.tolist(), after.nonzeros.tolist(),
                     before.cut_edges, after.cut_edges)
            del users
    elif method == "metis":
        used = "hash"  # one rank: nothing to cut
    if owner is None:
        owner = hash_owner(graph.n_users, graph.n_items, world_size, seed)
    part = Partition.from_owner(owner, world_size, graph.n_users, graph.n_items, method=used)
    log.info("partitioned %d users and %d items over %d ranks with %s: rows per rank %s",
             graph.n_users, graph.n_items, world_size, used, part.counts().tolist())
    return part


__all__ = [
    "PARTITION_METHODS",
    "Partition",
    "RankLoad",
    "balance_loads",
    "hash_owner",
    "partition_nodes",
    "rank_loads",
]
