"""The user-item training graph that LightGCN propagates over.

One structure serves three consumers: full-graph propagation (a torch sparse CSR
``A_hat``), neighbour sampling (a DGL graph whose edge ids index :attr:`BipartiteGraph.norm`)
and ranking/negative sampling (the user->items CSR of the training interactions).
Nodes ``0..n_users-1`` are users, ``n_users..n_users+n_items-1`` are items.

Directed edges are stored sorted by (dst, src), so ``A_hat`` in CSR form is built from
them without a copy and ``A_hat[dst, src] = norm[e]``. The degrees are those of the
FULL training graph: sampled computations re-weight against them (see
:mod:`gnaq_dist.propagation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any

import numpy as np
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import InteractionData, unique_pair_keys


def interactions_csr(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """User->items CSR ``(indptr, indices)`` of deduplicated pairs, items sorted per row.

    Sorted rows let callers test membership of ``(u, i)`` with one ``searchsorted`` on
    the global keys ``u * n_items + i`` (see :func:`csr_keys`).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if users.shape != items.shape or users.ndim != 1:
        raise GnaqInputError(f"users and items must be 1-D of equal length, got {users.shape} and {items.shape}")
    if users.size:
        if users.min() < 0 or users.max() >= n_users:
            raise GnaqInputError(f"user ids must lie in [0, {n_users}), got [{users.min()}, {users.max()}]")
        if items.min() < 0 or items.max() >= n_items:
            raise GnaqInputError(f"item ids must lie in [0, {n_items}), got [{items.min()}, {items.max()}]")
    keys = unique_pair_keys(users, items, n_items)  # sorted by (user, item), duplicates gone
    row = keys // n_items
    indices = keys - row * n_items
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_users), out=indptr[1:])
    return indptr, indices


def csr_rows_of(indptr: np.ndarray, indices: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same CSR with only the rows where ``keep`` (bool, one per row) is set; the others empty.

    Why keep every row's pointer: callers index rows by global user id (8 bytes a user),
    while the per-edge array shrinks to the kept rows' (a rank's own users).
    """
    keep = np.asarray(keep, dtype=bool)
    deg = np.diff(indptr)
    if keep.shape != deg.shape:
        raise GnaqInputError(f"keep has {keep.shape[0]} rows, the CSR {deg.shape[0]}")
    out = np.zeros_like(indptr)
    np.cumsum(np.where(keep, deg, 0), out=out[1:])
    return out, indices[np.repeat(keep, deg)]


def csr_keys(indptr: np.ndarray, indices: np.ndarray, n_items: int) -> np.ndarray:
    """Globally sorted keys ``u * n_items + i`` of a row-sorted CSR (for membership tests)."""
    rows = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))
    return rows * np.int64(n_items) + indices


def csr_tensor(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A torch sparse CSR tensor of entries without duplicates, sorted by row first if they
    are not (no COO coalescing: it holds several copies of the indices at its peak).

    Indices are int32 where they fit (4 bytes a non-zero less than int64; the products
    cost the same on CPU)."""
    if rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any()):  # a bool a value, not a diff
        order = torch.sort(rows, stable=True).indices
        rows, cols, values = rows[order], cols[order], values[order]
    index_dtype = torch.int32 if max(shape[0], shape[1], int(rows.numel())) < 2**31 else torch.int64
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0, out=crow[1:])
    crow, cols = crow.to(index_dtype), cols.to(index_dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and tested here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=shape, check_invariants=False)


class _SparseMM(torch.autograd.Function):
    """``A x`` with ``A``'s transpose kept: the backward is ``A^T g`` without transposing on
    every call (torch's generic CSR backward does, at several times the cost of the
    forward). ``A_hat`` is symmetric, so there the forward's matrix serves both."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, adj_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.adj_t = adj_t
        return adj @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return None, None, ctx.adj_t @ grad


def spmm(adj: torch.Tensor, x: torch.Tensor, adj_t: torch.Tensor | None = None) -> torch.Tensor:
    """``adj @ x``, differentiable in ``x``; ``adj_t`` is ``adj``'s transpose (None: symmetric)."""
    return _SparseMM.apply(adj, adj if adj_t is None else adj_t, x)


@dataclass(frozen=True, eq=False)
class TrainCSR:
    """The train edges as the user->items CSR alone: what BPR batches and negative sampling
    read of a :class:`BipartiteGraph`, without its symmetric edge arrays (40 bytes per edge)."""

    n_users: int
    n_items: int
    indptr: np.ndarray  # int64 (n_users + 1,)
    indices: np.ndarray  # int64 (E,), items sorted per row

    @classmethod
    def from_pairs(cls, n_users: int, n_items: int, users: np.ndarray, items: np.ndarray) -> TrainCSR:
        """From train (user, item) pairs; duplicates are dropped."""
        return cls(int(n_users), int(n_items), *interactions_csr(users, items, n_users, n_items))

    def train_csr(self) -> tuple[np.ndarray, np.ndarray]:
        return self.indptr, self.indices

    def rows_of(self, keep: np.ndarray) -> TrainCSR:
        """Only the users where ``keep`` is set (:func:`csr_rows_of`): a rank's own users."""
        return TrainCSR(self.n_users, self.n_items, *csr_rows_of(self.indptr, self.indices, keep))


@dataclass(eq=False)
class BipartiteGraph:
    """Symmetric user-item graph of the train edges with LightGCN normalisation."""

    n_users: int
    n_items: int
    src: torch.Tensor  # int64 (2E,), sorted by (dst, src)
    dst: torch.Tensor  # int64 (2E,)
    degree: torch.Tensor  # float32 (N,), full-graph degree (0 for isolated nodes)
    norm: torch.Tensor  # float32 (2E,), 1 / sqrt(deg_src * deg_dst)
    csr_indptr: np.ndarray  # int64 (n_users + 1,), user -> items of the train edges
    csr_indices: np.ndarray  # int64 (E,)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    @property
    def n_edges(self) -> int:
        """Number of undirected (user, item) train edges."""
        return int(self.csr_indices.shape[0])

    def train_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """User->items CSR ``(indptr, indices)`` of the train edges, items sorted per row."""
        return self.csr_indptr, self.csr_indices

    def adjacency(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """``A_hat`` as an (N, N) torch sparse CSR tensor, cached per dtype and device."""
        key = ("adj", dtype, torch.device(device))
        if key not in self._cache:
            inv_sqrt = self.degree.to(torch.float64).clamp(min=1.0).rsqrt()
            values = (inv_sqrt[self.src] * inv_sqrt[self.dst]).to(dtype)  # exact in dtype, not via float32
            adj = csr_tensor(self.dst, self.src, values, (self.n_nodes, self.n_nodes))
            self._cache[key] = adj.to(device)
        return self._cache[key]

    def dgl_graph(self):
        """DGL graph of the same directed edges (edge id = position), ``edata['w'] = norm``."""
        if "dgl" not in self._cache:
            from gnaq_dist._dgl import dgl

            g = dgl.graph((self.src, self.dst), num_nodes=self.n_nodes)
            g.edata["w"] = self.norm
            self._cache["dgl"] = g
        return self._cache["dgl"]


def build_graph_from_arrays(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray) -> BipartiteGraph:
    """Build the graph from train (user, item) pairs; duplicates are dropped."""
    if n_users <= 0 or n_items <= 0:
        raise GnaqInputError(f"n_users and n_items must be positive, got {n_users} and {n_items}")
    indptr, item_idx = interactions_csr(users, items, n_users, n_items)
    n_nodes = n_users + n_items
    user_idx = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(indptr))
    # Rows of users first (dst = user, src = item, already sorted by (user, item)), then
    # rows of items (dst = item, src = user), sorted by (item, user) with a stable sort.
    by_item = np.argsort(item_idx, kind="stable")
    dst = np.concatenate([user_idx, item_idx[by_item] + n_users])
    src = np.concatenate([item_idx + n_users, user_idx[by_item]])
    degree = np.bincount(dst, minlength=n_nodes).astype(np.float32)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1.0))  # isolated nodes: no edges, no NaN
    norm = (inv_sqrt[src] * inv_sqrt[dst]).astype(np.float32)
    return BipartiteGraph(
        n_users=int(n_users),
        n_items=int(n_items),
        src=torch.from_numpy(src),
        dst=torch.from_numpy(dst),
        degree=torch.from_numpy(degree),
        norm=torch.from_numpy(norm),
        csr_indptr=indptr,
        csr_indices=item_idx,
    )


def build_graph(data: InteractionData) -> BipartiteGraph:
    """Build the training graph of an :class:`InteractionData`."""
    return build_graph_from_arrays(data.n_users, data.n_items, data.train_user, data.train_item)


__all__ = ["BipartiteGraph", "TrainCSR", "build_graph", "build_graph_from_arrays", "csr_keys", "csr_rows_of",
           "interactions_csr"]
