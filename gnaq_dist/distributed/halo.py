"""Full-graph propagation split by owner: each rank computes its own nodes' layers.

Why: on sampled blocks, every rank's 3-hop neighbourhood covers most of the graph, so a
second rank does not halve anyone's work (docs/distributed.md). Here rank r computes
``H^(l+1)[own] = A_hat[own, :] Q^l`` from its own rows and the rows of its *halo* (the
remote neighbours of its own nodes): each rank does its share of the sparse products, and
only the halo's rows move between layers (fp32 activations forward, their gradients
backward). Together the ranks compute exactly what full-graph propagation computes on one
process (``propagation.propagate_full``).

Layer 0's halo rows travel in the method's wire form (packed codes + levels) through the
same plan (``HaloPlan.exchange.pull_served``, called by the training loop), and their
gradients in low-bit form (``push_gradients``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gnaq_dist.distributed.exchange import FixedExchange, WireCounter
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, csr_tensor, spmm

LayerFn = Callable[[torch.Tensor, int], torch.Tensor]


class _OwnerRows(torch.autograd.Function):
    """Rows of an activation split by owner (each rank holds its own nodes' rows), planned by
    a :class:`FixedExchange`: forward pulls them from their owners (fp32, counted as
    ``activations``), backward sends their gradients back, added to the owners' rows.
    Both are collectives: every rank must run the same forward and backward passes.
    """

    @staticmethod
    def forward(ctx, x_own: torch.Tensor, exchange: FixedExchange,  # type: ignore[override]
                counter: WireCounter | None) -> torch.Tensor:
        ctx.exchange, ctx.counter, ctx.n_own = exchange, counter, int(x_own.shape[0])
        return exchange.pull(x_own, counter)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g_own = ctx.exchange.push_gradients(grad, ctx.n_own, counter=ctx.counter, kind="activations")
        return g_own.to(grad.dtype), None, None


@dataclass(eq=False)
class HaloPlan:
    """Rank ``rank``'s rows of ``A_hat``: over its own nodes, then its halo, in that order."""

    own: torch.Tensor  # int64 (n_own,), sorted global ids (= partition.owned_ids(rank))
    halo: torch.Tensor  # int64 (n_halo,), global ids of remote neighbours of own nodes, by (owner, id)
    adj: torch.Tensor  # sparse CSR (n_own, n_own + n_halo)
    adj_t: torch.Tensor  # sparse CSR (n_own + n_halo, n_own)
    partition: Partition
    exchange: FixedExchange  # the halo's rows from their owners, planned once

    @classmethod
    def build(cls, graph: BipartiteGraph, partition: Partition, rank: int,
              counter: WireCounter | None = None) -> HaloPlan:
        """This rank's plan; a collective (the ranks tell each other their halos once)."""
        if partition.num_nodes != graph.n_nodes:
            raise GnaqInputError(f"partition covers {partition.num_nodes} nodes, the graph has {graph.n_nodes}")
        own = torch.from_numpy(partition.owned_ids(rank))
        owner = partition.owner_of(graph.dst)
        mine = owner == rank
        dst, src = graph.dst[mine], graph.src[mine]
        remote = partition.owner_of(src) != rank
        by_id = torch.unique(src[remote])
        # The halo grouped by owner (ids ascending within an owner): the order in which the
        # owners' rows arrive, so the exchange places them without a permutation.
        by_owner = torch.sort(partition.owner_of(by_id), stable=True).indices
        halo = by_id[by_owner]
        position = torch.empty_like(by_owner)
        position[by_owner] = torch.arange(by_owner.shape[0], dtype=by_owner.dtype)
        cols = torch.empty_like(src)
        cols[~remote] = partition.local_of(src[~remote])
        cols[remote] = own.shape[0] + position[torch.searchsorted(by_id, src[remote])]
        rows = partition.local_of(dst)  # non-decreasing: edges are sorted by dst, own ids ascending
        # The same values as ``graph.adjacency`` (float64 degrees, rounded once).
        inv_sqrt = graph.degree.to(torch.float64).clamp(min=1.0).rsqrt()
        values = (inv_sqrt[src] * inv_sqrt[dst]).to(torch.float32)
        n_own, n_in = int(own.shape[0]), int(own.shape[0] + halo.shape[0])
        adj = csr_tensor(rows, cols, values, (n_own, n_in))
        del dst, src, remote, inv_sqrt
        adj_t = csr_tensor(cols, rows, values, (n_in, n_own))
        return cls(own, halo, adj, adj_t, partition, FixedExchange(halo, partition, counter=counter))

    @property
    def nodes(self) -> torch.Tensor:
        """The layer-0 input nodes: own, then halo."""
        return torch.cat([self.own, self.halo])

    @property
    def n_own(self) -> int:
        return int(self.own.shape[0])

    def propagate(self, x_input: torch.Tensor, num_layers: int, layer_fn: LayerFn | None = None,
                  counter: WireCounter | None = None) -> list[torch.Tensor]:
        """``[Q^0 .. Q^L]`` of the own nodes, from ``H^0`` of :attr:`nodes` (collective)."""
        if x_input.dim() != 2 or x_input.shape[0] != self.adj.shape[1]:
            raise GnaqInputError(f"x_input must be ({self.adj.shape[1]}, d), got {tuple(x_input.shape)}")
        q_in = layer_fn(x_input, 0) if layer_fn is not None else x_input
        out = [q_in[: self.n_own]]
        for layer in range(1, num_layers + 1):
            h = spmm(self.adj, q_in, self.adj_t)
            q = layer_fn(h, layer) if layer_fn is not None else h
            out.append(q)
            if layer < num_layers:  # the next layer reads the halo's rows of this one
                q_in = torch.cat([q, _OwnerRows.apply(q, self.exchange, counter)])
        return out

    def describe(self) -> dict[str, int]:
        return {"own_nodes": self.n_own, "halo_nodes": int(self.halo.shape[0]), "nnz": int(self.adj.values().numel())}


def remote_rows(x_own: torch.Tensor, ids: torch.Tensor, partition: Partition,
                counter: WireCounter | None = None) -> torch.Tensor:
    """Differentiable rows ``ids`` (unique global ids) of an activation split by owner, through a
    plan used once (collective)."""
    return _OwnerRows.apply(x_own, FixedExchange(ids, partition, counter=counter), counter)


__all__ = ["HaloPlan", "remote_rows"]
