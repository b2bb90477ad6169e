"""Full-graph propagation split by owner: each rank computes its own nodes' layers.

Why: on sampled blocks, every rank's 3-hop neighbourhood covers most of the graph, so a
second rank does not halve anyone's work (docs/distributed.md). Here rank r computes
``H^(l+1)[own] = A_hat[own, :] Q^l`` from its own rows and the rows of its *halo* (the
remote neighbours of its own nodes): each rank does its share of the sparse products, and
only the halo's rows move between layers (fp32 activations forward, their gradients
backward). Together the ranks compute exactly what full-graph propagation computes on one
process (``propagation.propagate_full``).

Layer 0's halo rows travel in the method's wire form (packed codes + levels) through the
same plan (``HaloPlan.exchange.pull_wire_rows``, called by the training loop), and their
gradients in low-bit form (``push_gradients``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from gnaq_dist.distributed.halo_exchange import FixedExchange, reuse_or_allocate
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.shared_rows import DEFAULT_DIR
from gnaq_dist.distributed.wire import WireCounter
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, csr_tensor, spmm

LayerFn = Callable[[torch.Tensor, int], torch.Tensor]
_BLOCK = 1 << 24  # edges per block where setup makes float64 temporaries


def _id_dtype(num_nodes: int) -> type:
    return np.int32 if num_nodes < 2**31 else np.int64


def _product(a: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ x`` for sparse ``a``, written in place.

    Why not ``torch.mm(a, x, out=out)``: on the CPU that allocates the product anew and copies
    it into ``out`` (a fresh (n, d) table per call, faulted in page by page). ``addmm`` with
    ``beta=0`` writes into ``out`` and ignores what was there (NaN included)."""
    return torch.addmm(out, a, x, beta=0, out=out)


class _OwnerRows(torch.autograd.Function):
    """Rows of an activation split by owner (each rank holds its own nodes' rows), planned by
    a :class:`FixedExchange`: forward pulls them from their owners (fp32, counted as
    ``activations``), backward sends their gradients back, added to the owners' rows.
    Both are collectives: every rank must run the same forward and backward passes.
    """

    @staticmethod
    def forward(ctx, x_own: torch.Tensor, exchange: FixedExchange,  # type: ignore[override]
                counter: WireCounter | None, grad_out: torch.Tensor | None = None) -> torch.Tensor:
        ctx.exchange, ctx.counter, ctx.n_own, ctx.grad_out = exchange, counter, int(x_own.shape[0]), grad_out
        return exchange.pull_rows(x_own, counter)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g_own = ctx.exchange.push_gradients(grad, ctx.n_own, counter=ctx.counter, kind="activations",
                                            out=ctx.grad_out)
        return g_own.to(grad.dtype), None, None, None


class _MeanPropagation(torch.autograd.Function):
    """LightGCN's final rows of the own nodes, ``mean(Q^0 .. Q^L)`` with ``Q^l = H^l``, as one
    function of the layer-0 input (own rows, then halo rows).

    Why one function: propagation is linear, so the backward is the same walk over ``A_hat^T``
    (Horner's rule over the layers) and needs no saved activation. Autograd layer by layer
    keeps every layer and its gradient and allocates each anew; here three buffers of the plan
    (two of own rows, one of halo rows) serve every layer of every step, forward and backward,
    and only the output and the input's gradient are new tensors.

    The halo's rows travel while the own rows' part is computed: forward, layer ``l``'s halo
    rows are pulled while ``inner @ H^l`` runs, and ``outer @ halo`` is added when they have
    arrived; backward, the halo's gradient part (``outer^T t``, small) is pushed first and
    travels while ``inner t`` runs. The collectives are those of :meth:`HaloPlan.propagate`,
    in the same order: ``L - 1`` pulls forward, ``L - 1`` pushes backward.
    """

    @staticmethod
    def forward(ctx, x_input: torch.Tensor, plan: HaloPlan, num_layers: int,  # type: ignore[override]
                counter: WireCounter | None, out: torch.Tensor | None,
                grad_input: torch.Tensor | None) -> torch.Tensor:
        ctx.plan, ctx.num_layers, ctx.counter, ctx.grad_input = plan, num_layers, counter, grad_input
        x = x_input.detach()
        return plan.mean_forward(x[: plan.n_own], x[plan.n_own:], num_layers, counter, out=out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        plan, n = ctx.plan, ctx.plan.n_own
        grad_x = ctx.grad_input.detach() if ctx.grad_input is not None else \
            torch.empty((plan.n_input, grad.shape[1]), dtype=grad.dtype, device=grad.device)
        plan.mean_backward(grad.contiguous(), ctx.num_layers, ctx.counter, out=(grad_x[:n], grad_x[n:]))
        return grad_x, None, None, None, None, None


@dataclass(eq=False)
class HaloPlan:
    """Rank ``rank``'s rows of ``A_hat``, over its own nodes (``inner``) and its halo (``outer``)."""

    own: torch.Tensor  # int64 (n_own,), sorted global ids (= partition.owned_ids(rank))
    halo: torch.Tensor  # int64 (n_halo,), global ids of remote neighbours of own nodes, by (owner, id)
    inner: torch.Tensor  # sparse CSR (n_own, n_own): A_hat[own, own], symmetric
    outer: torch.Tensor  # sparse CSR (n_own, n_halo): A_hat[own, halo]
    outer_t: torch.Tensor  # sparse CSR (n_halo, n_own): its transpose
    partition: Partition
    exchange: FixedExchange  # the halo's rows from their owners, planned once
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # see _MeanPropagation

    @classmethod
    def build(cls, graph: BipartiteGraph, partition: Partition, rank: int,
              counter: WireCounter | None = None, shared_memory_dir: str | None = DEFAULT_DIR) -> HaloPlan:
        """This rank's plan; a collective (the ranks tell each other their halos once).
        ``shared_memory_dir``: where ranks on one host share the halo's float rows
        (:class:`FixedExchange`; None: through the process group)."""
        if partition.num_nodes != graph.n_nodes:
            raise GnaqInputError(f"partition covers {partition.num_nodes} nodes, the graph has {graph.n_nodes}")
        mine = partition.owner_of(graph.dst) == rank
        return cls._from_own_edges(graph.dst[mine], graph.src[mine], graph.degree, partition, rank, counter,
                                   shared_memory_dir)

    @classmethod
    def from_train_csr(cls, indptr: np.ndarray, items: np.ndarray, partition: Partition, rank: int,
                       counter: WireCounter | None = None, shared_memory_dir: str | None = DEFAULT_DIR) -> HaloPlan:
        """The same plan as :meth:`build`, from the user->items train CSR alone (collective).

        Why: the whole symmetric graph (``src``, ``dst``, ``norm``: 40 bytes per train edge)
        is never built, so a rank's setup holds its own edges, not everyone's."""
        n_users, n_items = partition.n_users, partition.n_items
        if indptr.shape[0] != n_users + 1:
            raise GnaqInputError(f"the train CSR has {indptr.shape[0] - 1} users, the partition {n_users}")
        row_len = np.diff(indptr)
        ids = _id_dtype(partition.num_nodes)  # node ids in 4 bytes where they fit
        users = np.repeat(np.arange(n_users, dtype=ids), row_len)
        degree = torch.from_numpy(np.concatenate([row_len, np.bincount(items, minlength=n_items)]).astype(np.float32))
        # Rows of own users: (dst = user, src = item), sorted by (user, item) as the CSR is.
        sel = partition.owner[users] == rank
        dst_u = users[sel]
        src_u = items[sel].astype(ids)
        src_u += n_users
        # Rows of own items: (dst = item, src = user), sorted by (item, user).
        sel = partition.owner[n_users:][items] == rank
        item_sel, user_sel = items[sel].astype(ids), users[sel]
        del users, sel
        order = np.argsort(item_sel, kind="stable")
        item_sel = item_sel[order]
        item_sel += n_users
        dst = torch.from_numpy(np.concatenate([dst_u, item_sel]))
        del dst_u, item_sel
        src = torch.from_numpy(np.concatenate([src_u, user_sel[order]]))
        del src_u, user_sel, order
        return cls._from_own_edges(dst, src, degree, partition, rank, counter, shared_memory_dir)

    @classmethod
    def _from_own_edges(cls, dst: torch.Tensor, src: torch.Tensor, degree: torch.Tensor, partition: Partition,
                        rank: int, counter: WireCounter | None, shared_memory_dir: str | None) -> HaloPlan:
        """The plan from the directed edges into this rank's nodes (sorted by ``(dst, src)``) and
        every node's degree."""
        own = torch.from_numpy(partition.owned_ids(rank))
        n_own = int(own.shape[0])
        owner = torch.from_numpy(partition.owner)  # int32, indexed without an int64 copy
        remote = owner[src] != rank
        by_id = torch.unique(src[remote]).to(torch.int64)
        # The halo grouped by owner (ids ascending within an owner): the order in which the
        # owners' rows arrive, so the exchange places them without a permutation.
        by_owner = torch.sort(partition.owner_of(by_id), stable=True).indices
        halo = by_id[by_owner]
        position = torch.empty_like(by_owner)
        position[by_owner] = torch.arange(by_owner.shape[0], dtype=by_owner.dtype)
        local = torch.from_numpy(partition.local_index.astype(_id_dtype(partition.num_nodes), copy=False))
        cols = local[src]
        cols[remote] = (n_own + position[torch.searchsorted(by_id, src[remote].to(torch.int64))]).to(cols.dtype)
        rows = local[dst]  # non-decreasing: edges are sorted by dst, own ids ascending
        del local
        # The same values as ``graph.adjacency`` (float64 degrees, rounded once), a block at a time.
        inv_sqrt = degree.to(torch.float64).clamp(min=1.0).rsqrt()
        values = torch.empty(src.shape[0], dtype=torch.float32)
        for a in range(0, src.shape[0], _BLOCK):
            values[a:a + _BLOCK] = inv_sqrt[src[a:a + _BLOCK]] * inv_sqrt[dst[a:a + _BLOCK]]
        n_halo = int(halo.shape[0])
        del dst, src, inv_sqrt, position, by_id, by_owner
        # A_hat[own, own] is symmetric (it serves as its own transpose); only the halo block is
        # transposed, for the backward.
        keep = ~remote
        inner = csr_tensor(rows[keep], cols[keep], values[keep], (n_own, n_own))
        del keep
        rows, cols, values = rows[remote], cols[remote] - n_own, values[remote]
        del remote
        outer = csr_tensor(rows, cols, values, (n_own, n_halo))
        outer_t = csr_tensor(cols, rows, values, (n_halo, n_own))
        exchange = FixedExchange(halo, partition, counter=counter, shared_memory_dir=shared_memory_dir)
        return cls(own, halo, inner, outer, outer_t, partition, exchange)

    @property
    def nodes(self) -> torch.Tensor:
        """The layer-0 input nodes: own, then halo."""
        return torch.cat([self.own, self.halo])

    @property
    def n_own(self) -> int:
        return int(self.own.shape[0])

    @property
    def n_halo(self) -> int:
        return int(self.halo.shape[0])

    @property
    def n_input(self) -> int:
        return self.n_own + self.n_halo

    def _apply(self, x_own: torch.Tensor, x_halo: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = A_hat[own, :] [x_own; x_halo]``."""
        _product(self.inner, x_own, out=out)
        return self._add_outer(out, x_halo)

    def _add_outer(self, out: torch.Tensor, x_halo: torch.Tensor) -> torch.Tensor:
        return torch.addmm(out, self.outer, x_halo, out=out) if self.n_halo else out

    def _check_input(self, x_input: torch.Tensor) -> None:
        if x_input.dim() != 2 or x_input.shape[0] != self.n_input:
            raise GnaqInputError(f"x_input must be ({self.n_input}, d), got {tuple(x_input.shape)}")

    def propagate(self, x_input: torch.Tensor, num_layers: int, layer_fn: LayerFn | None = None,
                  counter: WireCounter | None = None) -> list[torch.Tensor]:
        """``[Q^0 .. Q^L]`` of the own nodes, from ``H^0`` of :attr:`nodes` (collective)."""
        self._check_input(x_input)
        q_in = layer_fn(x_input, 0) if layer_fn is not None else x_input
        n = self.n_own
        q_own, q_halo = q_in[:n], q_in[n:]
        out = [q_own]
        for layer in range(1, num_layers + 1):
            h = spmm(self.inner, q_own)
            if self.n_halo:
                h = h + spmm(self.outer, q_halo, self.outer_t)
            q = layer_fn(h, layer) if layer_fn is not None else h
            out.append(q)
            if layer < num_layers:  # the next layer reads the halo's rows of this one
                q_own, q_halo = q, _OwnerRows.apply(q, self.exchange, counter)
        return out

    def propagate_mean(self, x_input: torch.Tensor, num_layers: int, counter: WireCounter | None = None, *,
                       out: torch.Tensor | None = None, grad_input: torch.Tensor | None = None) -> torch.Tensor:
        """``mean(H^0 .. H^L)`` of the own nodes from ``H^0`` of :attr:`nodes` (collective): what
        ``combine(propagate(x_input, L))`` gives for a method whose layers are plain
        (:attr:`~gnaq_dist.quant.base.EmbeddingMethod.linear_layers`), with no activation kept
        for the backward.

        ``out`` (n_own, d) receives the result and ``grad_input`` (n_input, d) the input's
        gradient, in place of new tensors (the training step passes :meth:`step_buffer` s, so a
        step allocates no table; ``grad_input`` may be ``x_input`` itself, which the backward
        no longer reads)."""
        self._check_input(x_input)
        for buf, rows, what in ((out, self.n_own, "out"), (grad_input, self.n_input, "grad_input")):
            if buf is not None and (tuple(buf.shape) != (rows, x_input.shape[1]) or buf.dtype != x_input.dtype
                                    or not buf.is_contiguous()):
                raise GnaqInputError(f"{what} must be a contiguous {x_input.dtype} ({rows}, {x_input.shape[1]}), "
                                     f"got {buf.dtype} {tuple(buf.shape)}")
        if num_layers == 0:
            return x_input[: self.n_own]
        return _MeanPropagation.apply(x_input, self, num_layers, counter, out, grad_input)

    def mean_forward(self, x_own: torch.Tensor, x_halo: torch.Tensor, num_layers: int,
                     counter: WireCounter | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``mean(H^0 .. H^L)`` of the own nodes from layer 0's own and halo rows, without autograd
        (collective; ``num_layers >= 1``): the forward of :meth:`propagate_mean`. The result is
        ``out`` if given (n_own, d), else a new table; the plan's kept buffers hold the layers."""
        n = self.n_own
        acc = out.detach().copy_(x_own) if out is not None else x_own.detach().clone()
        h, h_next = self._buffer("own", n, x_own), self._buffer("own2", n, x_own)
        halo = self._buffer("halo", self.n_halo, x_own)
        self._apply(x_own.detach(), x_halo.detach(), out=h)
        acc += h
        for _ in range(2, num_layers + 1):
            pending = self.exchange.start_pull_rows(h, halo, counter)
            _product(self.inner, h, out=h_next)
            self._add_outer(h_next, pending.wait())
            acc += h_next
            h, h_next = h_next, h
        return acc.div_(num_layers + 1)

    def mean_backward(self, grad: torch.Tensor, num_layers: int, counter: WireCounter | None = None, *,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient of :meth:`mean_forward`'s input, own rows and halo rows, from ``grad``
        (n_own, d) of its result (collective; ``grad`` is read, not written). Into ``out``
        if given, else into kept buffers of the plan (valid until its next propagation)."""
        n, L = self.n_own, num_layers
        g = grad.detach()
        t, spare = g, [self._buffer("own", n, g), self._buffer("own2", n, g)]
        for i in range(L - 1):  # t <- g + E^T A^T t  (E: own rows, then the halo's from their owners)
            halo = self.exchange.push_buffer(g)  # shared memory: written where the owners read it
            if halo is None:
                halo = self._buffer("halo", self.n_halo, g)
            _product(self.outer_t, t, out=halo)
            pending = self.exchange.start_push_gradients(halo, counter)
            u = _product(self.inner, t, out=spare[i % 2])  # inner is symmetric: its own transpose
            u += g
            t = pending.wait(u)
        if out is None:  # the own buffer that t is not, and the halo's (both free now)
            free = spare[1] if t.data_ptr() == spare[0].data_ptr() else spare[0]
            out = (free, self._buffer("halo", self.n_halo, g))
        g_own, g_halo = out
        _product(self.inner, t, out=g_own)
        g_own += g
        _product(self.outer_t, t, out=g_halo)
        return g_own.div_(L + 1), g_halo.div_(L + 1)

    def _buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, d) buffer kept for the next call (see :class:`_MeanPropagation`)."""
        buf = self._buffers[name] = reuse_or_allocate(self._buffers.get(name), rows, like)
        return buf

    def mean_of_own_rows(self, x_own: torch.Tensor, num_layers: int, counter: WireCounter | None = None, *,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`mean_forward` from this rank's fp32 rows ``x_own`` read in place: the halo's
        layer-0 rows (fp32 is their wire form, counted as ``rows_fetched``) arrive straight in
        the plan's halo table, which the forward reads once before its layers reuse it
        (collective; ``num_layers >= 1``)."""
        halo = self.exchange.start_pull_rows(x_own, self._buffer("halo", self.n_halo, x_own), counter,
                                             kind="rows_fetched").wait()
        return self.mean_forward(x_own, halo, num_layers, counter, out=out)

    def step_buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The training step's kept tables, reused every step (no page faults for fresh ones):
        ``"input"`` (n_input, d) holds the layer-0 rows, then their gradient; ``"output"``
        (n_own, d) the final rows, then their gradient."""
        rows = {"input": self.n_input, "output": self.n_own}[name]
        return self._buffer(f"step_{name}", rows, like)

    def idle_own_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """An (n_own, d) table of :meth:`propagate_mean`'s that is free between its forward and
        its backward (both overwrite it): a step's scratch there costs no memory of its own."""
        return self._buffer("own2", self.n_own, like)

    def reserve(self, dim: int, dtype: torch.dtype = torch.float32, *, input_table: bool = True) -> None:
        """Make and touch now every table that a training step keeps (the propagation's, the
        step's, the exchange's rows served), instead of in the next step; ``input_table=False``
        leaves out the layer-0 table, which a step of plain fp rows does not use.

        Why: their first touch faults in every page, which would otherwise land in the first step
        (and in the first after each evaluation); and a machine short of memory fails here,
        before training, not in the middle of a step."""
        like = torch.empty((0, int(dim)), dtype=dtype)
        for name, rows in (("own", self.n_own), ("own2", self.n_own), ("halo", self.n_halo),
                           ("step_input", self.n_input), ("step_output", self.n_own)):
            if name == "step_input" and not input_table:
                self._buffers.pop(name, None)
            elif name not in self._buffers:  # kept ones are touched already
                self._buffer(name, rows, like).zero_()
        self.exchange.reserve(like)

    def release_buffers(self) -> None:
        """Free every kept table, the step's and the propagation's (evaluation, checkpoints:
        phases that need the memory for their own; :meth:`reserve` or the next step makes them
        again)."""
        self._buffers.clear()
        self.exchange.release()

    def describe(self) -> dict[str, int]:
        return {"own_nodes": self.n_own, "halo_nodes": self.n_halo,
                "nnz": int(self.inner.values().numel() + self.outer.values().numel())}


def final_own_rows(plan: HaloPlan, method, x_input: torch.Tensor, num_layers: int, counter: WireCounter | None, *,
                   out: torch.Tensor | None = None, grad_input: torch.Tensor | None = None) -> torch.Tensor:
    """The own nodes' final rows of ``method`` (an :class:`~gnaq_dist.quant.base.EmbeddingMethod`)
    over the plan: one linear function where the method's layers are plain (no activation kept;
    ``out`` and ``grad_input`` as in :meth:`HaloPlan.propagate_mean`), else layer by layer with
    the method's ``layer_fn`` (collective)."""
    if method.linear_layers:
        return plan.propagate_mean(x_input, num_layers, counter, out=out, grad_input=grad_input)
    return method.combine(plan.propagate(x_input, num_layers, method.layer_fn, counter=counter))


__all__ = ["HaloPlan", "final_own_rows"]
