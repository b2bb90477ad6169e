"""A worker's shard of an embedding method: its own rows, how they travel, how they learn.

Why one class per shard and not per method: the training loop must treat every method
alike, but the methods differ in what a row *is* on the wire. Two row formats:

* ``"packed"`` (GNAQ): the storage form, packed b-bit codes plus ``phi(levels)`` in
  ``model.level_dtype`` (:class:`~gnaq_dist.distributed.rows.QuantizedShard`,
  24 bytes a row at d = 64, b = 2 with fp16 levels). The requester's differentiable
  view is ``x = gather(levels, codes)`` with the fetched levels as the leaf, so the
  gradient it sends back has ``2^b`` values a row. The owner chains it through
  ``phi`` with its own fp32 levels (``dL/dc = phi'(c) dL/dphi(c)``).
* ``"derived"`` (gnaq_lat): the same wire rows as ``"packed"``, the codes derived from the
  owner's integer latent (:meth:`~gnaq_dist.quant.gnaq_latent.GNAQLatent.packed_codes_of`).
  The requester's leaf is the dequantized row ``x`` itself, so the gradient it sends back is
  ``dL/dx`` (d values a row, what the latent trains on, as GNAQ-STE's); the L2 term's is
  computed by the owner in closed form (:meth:`MethodShard.set_l2_gradient`). The owner derives the
  levels' gradient from them and its own codes (``dL/dc_k = sum_{d: q_d = k} dL/dx_d``, what
  autograd's gather gives in one process), steps the levels with Adam and hands ``dL/dx`` to
  the latent's update (:meth:`MethodShard.update_latent`). No fp32 ``(N, d)`` table and no Adam
  state of that size: the latent stays packed at its owner.
* ``"latent"`` (fp, gnaq_ste, lsq, n2uq): the trainable row parameters as fp32,
  concatenated (``4 * sum(widths)`` bytes a row: ``4d`` for fp/lsq/n2uq,
  ``4(d + 2^b)`` for gnaq_ste). Straight-through methods train a d-dim latent, so
  they must ship d-dim rows and get d-dim gradients back, whatever their storage
  form; the view runs the method's own ``embed`` on the fetched rows (via
  :func:`torch.func.functional_call`), so its forward and backward are the method's.

Dense parameters (LSQ's step, N2UQ's intervals) are replicated; the loop all-reduces
their gradients. The method instance holds only the owned rows (``num_nodes`` = owned
rows); where a method's maths uses the table size (LSQ's gradient scale ``n_w = N d``)
the view presents the global ``N``, so every W computes the same function.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.rows import LatentShard, QuantizedShard
from gnaq_dist.distributed.sparse_adam import RowSparseAdam
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.methods import GNAQ_VARIANTS, is_packed_gnaq
from gnaq_dist.quant import build_method
from gnaq_dist.quant.base import EmbeddingMethod
from gnaq_dist.quant.dequant_kernels import code_counts, dequantize_rows, level_gradients


class _EmbedCall(torch.nn.Module):
    """``forward()`` = ``method.embed(None)``, so functional_call can swap the row parameters."""

    def __init__(self, method: EmbeddingMethod) -> None:
        super().__init__()
        self.m = method

    def forward(self) -> torch.Tensor:
        return self.m.embed(None)


@contextlib.contextmanager
def _logical_rows(method: EmbeddingMethod, n: int) -> Iterator[None]:
    """Present ``n`` as the method's table size while a view runs (LSQ's gradient scale)."""
    saved = method.num_nodes
    method.num_nodes = n
    try:
        yield
    finally:
        method.num_nodes = saved


class _DequantizePacked(torch.autograd.Function):
    """Packed rows with their levels as differentiable leaves -> the (n, d) float table, in one
    pass (:func:`~gnaq_dist.quant.dequant_kernels.dequantize_rows`); the backward sums the table's
    gradient into each row's levels (:func:`~gnaq_dist.quant.dequant_kernels.level_gradients`).

    Why not ``torch.gather``: it needs the codes unpacked and an int64 index (8 bytes a value)
    forward and again backward. Only the packed bytes are kept for the backward (16 bytes a
    row at 2 bits, d = 64)."""

    @staticmethod
    def forward(ctx, levels: torch.Tensor, packed: torch.Tensor, bits: int, width: int,  # type: ignore[override]
                out: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.bits = bits
        n = int(packed.shape[0])
        if out is not None and (tuple(out.shape) != (n, width) or out.dtype != torch.float32
                                or not out.is_contiguous()):
            out = None
        return dequantize_rows(packed, levels.detach(), bits, width, out=None if out is None else out.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        return level_gradients(packed, grad, ctx.bits), None, None, None, None


@dataclass
class RowView:
    """Fetched rows as differentiable leaves, and their layer-0 embeddings (n, d)."""

    leaves: list[torch.Tensor]  # one per row parameter the wire carries gradients for
    embeddings: torch.Tensor | None
    packed: torch.Tensor | None = None  # packed rows: their codes as packed bytes (n, code bytes)
    bits: int = 0  # ... at this many bits a code,
    width: int = 0  # ... this many values a row

    def pop_embeddings(self) -> torch.Tensor:
        """The embeddings, no longer held here: the (n, d) table then lives only as long as its
        reader (the propagation) keeps it."""
        x, self.embeddings = self.embeddings, None
        if x is None:
            raise RuntimeError("the view's embeddings were already taken")
        return x


class MethodShard:
    """The rows ``partition.owned_ids(rank)`` of an embedding method, with their optimizer."""

    def __init__(self, method: EmbeddingMethod, partition: Partition, rank: int, lr: float,
                 level_dtype: torch.dtype = torch.float16) -> None:
        owned = partition.owned_ids(rank)
        if method.num_nodes != max(int(owned.shape[0]), 1):
            raise GnaqInputError(f"method has {method.num_nodes} rows, rank {rank} owns {owned.shape[0]}")
        self.method = method
        self.partition = partition
        self.rank = rank
        self.owned = owned
        self.level_dtype = level_dtype
        spec = GNAQ_VARIANTS.get(method.name)
        self.format = "packed" if is_packed_gnaq(method.name) else \
            "derived" if spec is not None and spec.latent_bits else "latent"
        self.row_params = list(method.trainable_row_params())
        # Packed rows: the wire carries the levels; the rest (GNAQ's score bias) learns from
        # gradients the step computes apart (:meth:`apply_row_gradients`' ``extra``).
        self.extra_params = self.row_params[1:] if self.format != "latent" else []
        self._served_codes: torch.Tensor | None = None  # derived: the own rows' codes until the latent moves (_own_codes)
        self._l2: tuple[torch.Tensor, torch.Tensor] | None = None  # derived: this step's L2 gradient of own rows
        if self.format == "derived":
            # the rounding noise of a row's latent is keyed by its global id: the same for every W
            method.global_ids = torch.from_numpy(owned).to(torch.int64)
        self.dense = [p for p in method.dense_params() if p.requires_grad]
        self.optimizer = RowSparseAdam(self.row_params, lr)
        self.dense_optimizer = torch.optim.Adam(self.dense, lr=lr) if self.dense else None
        names = {id(p): n for n, p in method.named_parameters()}
        self._names = [f"m.{names[id(p)]}" for p in self.row_params]
        self._call = _EmbedCall(method)
        self._latent = LatentShard(self.row_params, method.dim)

    @property
    def num_owned(self) -> int:
        return int(self.owned.shape[0])

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps, rows' and dense parameters' alike."""
        self.optimizer.lr = float(lr)
        if self.dense_optimizer is not None:
            for group in self.dense_optimizer.param_groups:
                group["lr"] = float(lr)

    # -- serving and viewing rows ------------------------------------------------------
    def server(self):
        """This rank's RowServer for the training fetch (the method's wire row format)."""
        if self.format in ("packed", "derived"):
            levels = self.method.phi(self.method.levels.detach()).to(self.level_dtype).unsqueeze(1)
            if self.format == "packed":
                codes = self.method.packed_codes
            else:
                codes = self._own_codes()
            return QuantizedShard(codes, levels, self.method.bits, self.method.dim)
        return self._latent

    def _own_codes(self) -> torch.Tensor:
        """Derived rows: the packed codes of every own row, the latent's bins, computed once a step
        (served, read by the level gradients and the L2 term) until :meth:`update_latent` moves the latent."""
        if self._served_codes is None:
            self._served_codes = self.method.packed_codes_of(None)
        return self._served_codes

    def gradient_widths(self) -> list[int]:
        """Values per row of each gradient message (one message per row parameter)."""
        if self.format == "derived":
            return [self.method.dim]
        return [1 << self.method.bits] if self.format == "packed" else list(self._latent.widths)

    def view(self, server, payload: torch.Tensor, out: torch.Tensor | None = None) -> RowView:
        """Differentiable layer-0 embeddings of fetched wire rows (``fetch_rows(decode=False)``);
        packed rows are written into ``out`` (n, d) if given (a table kept between steps)."""
        if self.format == "packed":
            packed, levels = server.split_payload(payload)
            leaf = levels[:, 0, :].expand(payload.shape[0], -1).clone().requires_grad_(True)
            x = _DequantizePacked.apply(leaf, packed, server.bits, server.width, out)
            return RowView([leaf], x, packed, server.bits, server.width)
        if self.format == "derived":  # the dequantized rows are the leaf: their gradient is dL/dx
            packed, levels = server.split_payload(payload)
            n = int(payload.shape[0])
            if out is not None and (tuple(out.shape) != (n, server.width) or out.dtype != torch.float32
                                    or not out.is_contiguous()):
                out = None
            levels = levels[:, 0, :].contiguous()
            x = dequantize_rows(packed, levels, server.bits, server.width, out=out)
            leaf = x.detach().requires_grad_(True)
            return RowView([leaf], leaf)
        values = server.decode(payload)
        if values.shape[0] == 0:  # nothing fetched (a rank without positives): no forward to run
            leaves = [v.reshape((0,) + tuple(p.shape[1:])).clone().requires_grad_(True)
                      for v, p in zip(self._latent.split(values), self.row_params)]
            return RowView(leaves, torch.zeros(0, self.method.dim))
        leaves = [v.reshape((v.shape[0],) + tuple(p.shape[1:])).clone().requires_grad_(True)
                  for v, p in zip(self._latent.split(values), self.row_params)]
        with _logical_rows(self.method, self.partition.num_nodes):
            x = torch.func.functional_call(self._call, dict(zip(self._names, leaves)), ())
        return RowView(leaves, x)

    @staticmethod
    def row_l2(view: RowView, weights: torch.Tensor) -> torch.Tensor:
        """``sum_i weights_i ||x_i||^2`` over the view's first ``len(weights)`` rows, differentiable.

        Only rows of non-zero weight are read (the batch's nodes). Packed rows need no (n, d)
        table: a row's squared norm is ``sum_k count_k * level_k^2`` over its codes' counts
        (:func:`~gnaq_dist.quant.dequant_kernels.code_counts`), differentiable in the levels."""
        rows = torch.nonzero(weights).squeeze(1)
        w = weights[rows]
        if view.packed is not None:
            leaf = view.leaves[0][rows]
            counts = code_counts(view.packed[rows], view.bits, view.width)
            return (w * (counts * leaf.to(torch.float32).pow(2)).sum(1)).sum()
        else:
            x = view.embeddings[rows]
        return (w * x.pow(2).sum(1)).sum()

    @staticmethod
    def leaf_grads(view: RowView) -> list[torch.Tensor]:
        """Each leaf's gradient as (n, width) (zeros where autograd left none)."""
        out = []
        for leaf in view.leaves:
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            out.append(g.reshape(leaf.shape[0], -1))
        return out

    # -- applying summed gradients at the owner ------------------------------------------
    def _param_grads(self, rows: torch.Tensor | None, wire_grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.format == "derived":  # dL/dx -> the levels' gradient through the rows' own codes
            (dx,) = wire_grads
            codes = self._own_codes()
            packed = codes if rows is None else codes[rows]
            g = level_gradients(packed.contiguous(), dx.contiguous(), self.method.bits)
            l2, self._l2 = self._l2, None
            if l2 is not None:  # the L2 term's dL/dx of the batch's rows: into their levels, and its own update
                l2_rows, l2_g = l2
                at = l2_rows if rows is None else torch.searchsorted(rows, l2_rows)
                g.index_add_(0, at, level_gradients(codes[l2_rows].contiguous(), l2_g.contiguous(), self.method.bits))
                self.method.stash(l2_rows, l2_g)
            self.method.stash(rows, dx)  # the latent's gradients, applied by update_latent after the step
            wire_grads = [g]
        if self.format in ("packed", "derived"):
            (g,) = wire_grads
            if self.method.phi_name == "identity":
                return [g]
            with torch.enable_grad():
                levels = self.method.levels.detach()  # a new leaf over the same storage
                c = (levels if rows is None else levels[rows]).requires_grad_(True)
                (gc,) = torch.autograd.grad(self.method.phi(c), c, g)
            return [gc]
        return [g.reshape((g.shape[0],) + tuple(p.shape[1:])) for g, p in zip(wire_grads, self.row_params)]

    def apply_row_gradients(self, rows: torch.Tensor | None, wire_grads: list[torch.Tensor],
                            clip: float | None, extra: list[torch.Tensor] | None = None) -> None:
        """Owner side: summed wire gradients of local ``rows`` (None: every owned row, in order)
        -> parameter gradients -> clip (in place: the caller's sums are spent) -> Adam.
        ``extra``: the gradients of :attr:`extra_params` for the same rows."""
        extra = list(extra or [])
        if len(extra) != len(self.extra_params):
            raise RuntimeError(f"{len(self.extra_params)} extra row parameters, {len(extra)} gradients")
        grads = self._param_grads(rows, wire_grads) + [
            g.reshape((g.shape[0],) + tuple(p.shape[1:])).to(torch.float32) for g, p in zip(extra, self.extra_params)]
        if clip is not None:
            grads = [g.clamp_(-clip, clip) for g in grads]
        self.optimizer.step(rows, grads)

    def zero_dense_grads(self) -> None:
        for p in self.dense:
            p.grad = torch.zeros_like(p)

    def apply_dense(self, clip: float | None) -> None:
        """Dense step, the same on every rank (gradients already summed over ranks)."""
        if self.dense_optimizer is None:
            return
        if clip is not None:
            torch.nn.utils.clip_grad_value_(self.dense, clip)
        self.dense_optimizer.step()

    def set_l2_gradient(self, rows: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> None:
        """Derived rows: the L2 term's ``dL/dx = weights_i x_i`` of own ``rows`` (local, sorted; ``x``
        their layer-0 rows), in closed form at the owner. It reaches the levels with the step's
        gradient and the latent as an update of its own, before the propagation's, as the backward
        of one process hands them over (:meth:`~gnaq_dist.quant.gnaq_latent.GNAQLatent.refine`)."""
        self._l2 = (rows, x * weights.to(x.dtype).unsqueeze(1))

    def own_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Derived rows: the layer-0 rows of own ``rows`` as the wire serves them (levels in
        ``model.level_dtype``), float32 (n, d)."""
        levels = self.method.phi(self.method.levels.detach()[rows]).to(self.level_dtype).to(torch.float32)
        return dequantize_rows(self._own_codes()[rows], levels.contiguous(), self.method.bits, self.method.dim)

    @torch.no_grad()
    def update_latent(self, step: float) -> None:
        """Derived rows, after the step: the owner applies the summed ``dL/dx`` its rows received
        to their latent with latent step ``step`` (:meth:`~gnaq_dist.quant.gnaq_latent.GNAQLatent.refine`).
        Nothing moves: the other ranks read the new codes with the next step's rows."""
        self._served_codes = None
        self.method.latent_lr = step
        self.method.refine(None, None)

    @torch.no_grad()
    def refine(self, rows: torch.Tensor | None, propagated: torch.Tensor) -> None:
        """Re-assign codes of owned ``rows`` (None: every owned row; the method's packed codes are
        also the wire codes, so the next fetch or halo pull serves the new ones)."""
        self.method.refine(rows, propagated)

    # -- sizes -------------------------------------------------------------------------
    def row_counts(self) -> dict[str, int]:
        """Rows of every row parameter, row buffer and optimizer state this rank holds."""
        return {
            "owned_rows": self.num_owned,
            "param_rows": max(int(p.shape[0]) for p in self.row_params),
            "buffer_rows": max((int(b.shape[0]) for b in self.method.row_buffers()), default=0),
            "optimizer_state_rows": self.optimizer.state_rows(),
            "optimizer_moment_rows": max(int(m.shape[0]) for m in self.optimizer.exp_avg),
        }


    def memory(self) -> dict[str, float | None]:
        """Bytes this rank holds for its rows: the table (row parameters + row buffers) and Adam.

        ``floor_bytes_per_node`` is the least a trainable row can take in its training form:
        ``b·d/8`` bytes of codes plus ``2^b`` fp32 levels for GNAQ (levels are trained in fp32;
        the exported table stores them in ``model.level_dtype``), ``4·width`` for fp32 rows.
        """
        n = max(self.num_owned, 1)
        table = sum(t.numel() * t.element_size() for t in self.row_params + self.method.row_buffers())
        if self.format == "packed":
            floor = self.method.dim * self.method.bits / 8 + 4 * (1 << self.method.bits) + 4 * len(self.extra_params)
        elif self.format == "derived":  # the packed latent (the codes are its bins), fp32 levels, (v, t)
            floor = self.method.latent_bytes_per_node + 4 * (1 << self.method.bits) + 8
        else:
            floor = float(self._latent.row_bytes)
        per_node = table / n
        return {"table_bytes": int(table), "table_bytes_per_node": per_node, "floor_bytes_per_node": floor,
                "table_over_floor": per_node / floor, "fp32_bytes_per_node": 4.0 * self.method.dim,
                "optimizer_bytes": self.optimizer.state_bytes(),
                "optimizer_bytes_per_node": self.optimizer.state_bytes() / n}


def build_shard_method(name: str, owned_rows: torch.Tensor, dim: int, bits: int | None, num_layers: int,
                       phi: str | None, full_table: torch.Tensor | None = None,
                       graph=None, **options) -> EmbeddingMethod:
    """A method over the owned rows, initialised from their fp rows (``owned_rows``, (n, d)).

    Per-row initialisations (GNAQ's levels and codes, the latent tables) need only the
    owned rows, so this is exact. Dense parameters whose initialisation looks at the
    whole table (LSQ's step, N2UQ's breakpoints and output map) are copied from a
    method initialised on ``full_table``, so every rank and every W starts alike.
    Construction draws from the global torch RNG; it is forked so the run's stream does
    not depend on how many rows a rank owns.
    """
    n = max(int(owned_rows.shape[0]), 1)
    with torch.random.fork_rng():
        method = build_method(name, n, dim, bits, num_layers, phi=phi, **options)
        if owned_rows.shape[0]:
            method.init_from_full_precision(owned_rows)
        if method.dense_params():
            if full_table is None:
                raise GnaqInputError(f"{name}: dense parameters need the full warm-up table to initialise")
            full = build_method(name, int(full_table.shape[0]), dim, bits, num_layers, phi=phi, **options)
            full.init_from_full_precision(full_table)
            with torch.no_grad():
                for mine, ref in zip(method.dense_params(), full.dense_params()):
                    mine.copy_(ref)
    return method


__all__ = ["MethodShard", "RowView", "build_shard_method"]
