"""The interface every embedding method (fp, GNAQ, baselines) offers the training loop.

The model code owns propagation; a method owns the layer-0 table and how it is
quantized, plus hooks on the propagated layers (``layer_fn``, ``combine``) and a loss
term of its own (``extra_loss``) that only BiGeaR overrides. Keeping the methods behind
one small interface lets the single-process and distributed trainers treat them alike:
``trainable_row_params`` are sharded by row, ``dense_params`` are all-reduced.
"""

from __future__ import annotations

import math

import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.packing import PackedTable


class EmbeddingMethod(torch.nn.Module):
    """Base class: identity ``layer_fn``, mean ``combine``, no refinement."""

    name: str = "base"
    bits: int | None = None
    uses_l2: bool = True  # optim.l2 applies to the layer-0 rows (GNAQ's reference variant: no L2)
    refines: bool = False  # codes are re-assigned from propagated embeddings (:meth:`refine`)

    def __init__(self, num_nodes: int, dim: int, num_layers: int = 3) -> None:
        super().__init__()
        if num_nodes < 1 or dim < 1:
            raise GnaqInputError(f"num_nodes and dim must be >= 1, got {num_nodes} and {dim}")
        if num_layers < 0:
            raise GnaqInputError(f"num_layers must be >= 0, got {num_layers}")
        self.num_nodes = int(num_nodes)
        self.dim = int(dim)
        self.num_layers = int(num_layers)

    # -- helpers ---------------------------------------------------------------------
    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _ids(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """Row ids as int64 on this method's device (None stays None = all rows)."""
        if ids is None:
            return None
        ids = torch.as_tensor(ids)
        if ids.dim() != 1:
            raise GnaqInputError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        return ids.to(device=self._device(), dtype=torch.int64)

    def _check_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() != 2 or tuple(weight.shape) != (self.num_nodes, self.dim):
            raise GnaqInputError(
                f"full-precision weight must be ({self.num_nodes}, {self.dim}), got {tuple(weight.shape)}"
            )
        return weight.detach().to(device=self._device(), dtype=torch.float32)

    def _check_table(self, table: PackedTable, groups: int = 1) -> None:
        if table.method != self.name or table.bits != self.bits:
            raise GnaqInputError(
                f"packed table is {table.method}/{table.bits} bits, this method is {self.name}/{self.bits}"
            )
        if table.num_rows != self.num_nodes or table.dim != self.dim or table.groups != groups:
            raise GnaqInputError(
                f"packed table is {table.num_rows} x {table.groups} x {table.dim}, expected "
                f"{self.num_nodes} x {groups} x {self.dim}"
            )

    # -- the interface ---------------------------------------------------------------
    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Layer-0 embeddings of rows ``ids`` (all rows if None), (len(ids), dim)."""
        raise NotImplementedError

    @property
    def linear_layers(self) -> bool:
        """True when :meth:`layer_fn` is the identity and :meth:`combine` the mean: propagation
        is then linear in the layer-0 rows, and can run as one function that keeps no layer."""
        return type(self).layer_fn is EmbeddingMethod.layer_fn and type(self).combine is EmbeddingMethod.combine

    def layer_fn(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Transform of every layer output H^l; identity unless the method binarizes layers."""
        return h

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """LightGCN's final embedding: the mean of H^0..H^L.

        Summed pairwise, not ``stack(...).mean(0)``: the stack copies all L+1 layers and its
        backward expands the gradient L+1 times (twice the cost, forward and backward)."""
        if not layers:
            raise GnaqInputError("combine needs at least one layer")
        out = layers[0]
        for q in layers[1:]:
            out = out + q
        return out / len(layers)

    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        """Start the quantized phase from warm-up weights (N, dim)."""
        raise NotImplementedError

    def refine(self, ids: torch.Tensor | None, propagated: torch.Tensor) -> None:
        """GNAQ's dynamic code re-assignment of rows ``ids`` (None: all); a no-op for every other method."""
        return None

    def extra_loss(self, final: torch.Tensor, users: torch.Tensor, grad: torch.Tensor) -> float:
        """A loss of the method's own beside BPR, on the final rows of all nodes (``final``, N
        rows) and the batch's ``users`` (one per positive): its gradient w.r.t. ``final`` is
        added into ``grad``, its value returned. None but BiGeaR's distillation has one."""
        return 0.0

    def bias_of(self, ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-node score biases of rows ``ids`` (None: all), or None when the score has none."""
        return None

    def code_state(self) -> torch.Tensor | None:
        """A copy of the codes (any form :meth:`codes_changed` reads), or None for a method without codes."""
        return None

    def codes_changed(self, before: torch.Tensor) -> tuple[int, int]:
        """(codes that differ from ``before``, codes in all) over this method's rows."""
        return 0, 0

    @torch.no_grad()
    def layer0_error(self, level_dtype: torch.dtype = torch.float16) -> tuple[float, float] | None:
        """``(sum |x - Q(x)|, sum |x|)`` over the layer-0 table: x the fp latent table the method
        trains (its ``latent``), Q(x) its quantized layer-0 rows; None where there is no
        quantizer or no latent table (fp, BiGeaR). GNAQ overrides it."""
        latent = getattr(self, "latent", None)
        if not isinstance(latent, torch.Tensor) or latent.dim() != 2 or latent.shape[1] != self.dim:
            return None
        x = latent.detach()
        q = self.layer_fn(self.embed(None).detach(), 0)
        return float((x - q).abs().sum()), float(x.abs().sum())

    def reg_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """What L2 applies to: the layer-0 embedding the model propagates."""
        return self.embed(ids)

    def pack(self, level_dtype: torch.dtype = torch.float16) -> PackedTable:
        raise NotImplementedError

    def load_packed(self, table: PackedTable) -> None:
        raise NotImplementedError

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        """Parameters with one row per node (sharded across workers, row-sparse updates)."""
        return []

    def dense_params(self) -> list[torch.nn.Parameter]:
        """Parameters shared by all nodes (all-reduced across workers)."""
        return []

    def row_buffers(self) -> list[torch.Tensor]:
        """Non-trained per-row state that must be sharded with the rows (GNAQ's codes)."""
        return []

    def extra_repr(self) -> str:
        return f"name={self.name}, bits={self.bits}, num_nodes={self.num_nodes}, dim={self.dim}"


def score_rows(final: torch.Tensor, bias: torch.Tensor | None, is_user: torch.Tensor) -> torch.Tensor:
    """Final rows widened so that a dot product carries the score biases: a user's row
    ``[h_u, 1, b_u]``, an item's ``[h_i, b_i, 1]``, so ``<u, i> = <h_u, h_i> + b_i + b_u``.

    Why widen rather than add: the loss, the item exchange and the ranking all take dot
    products of rows, and stay as they are; the gradient of the two extra columns is the
    biases' gradient. ``bias`` None: ``final`` as it is. Differentiable in ``final`` and ``bias``.
    """
    if bias is None:
        return final
    bias = bias.to(final.dtype).reshape(-1)
    one = torch.ones_like(bias)
    item_bias_col = torch.where(is_user, one, bias)  # users 1, items b_i
    user_bias_col = torch.where(is_user, bias, one)  # users b_u, items 1
    return torch.cat([final, item_bias_col.unsqueeze(1), user_bias_col.unsqueeze(1)], dim=1)


def init_normal_table(num_nodes: int, dim: int, std: float = 0.1) -> torch.Tensor:
    """N(0, std^2) table from the global torch seed (LightGCN's initialisation)."""
    return torch.randn(num_nodes, dim) * std


def init_normal_rows(num_nodes: int, dim: int, rows: torch.Tensor, std: float = 0.1,
                     chunk_rows: int = 65_536) -> torch.Tensor:
    """``init_normal_table(num_nodes, dim, std)[rows]`` without holding the whole table.

    Why: every rank must start from the same global table whatever W is, but a rank needs
    only its own rows. The seed's stream is drawn chunk by chunk (torch's CPU normal
    sampler gives the same values in chunks as in one call; the 1-vs-2-rank tests check
    it) and only ``rows`` are kept: memory grows with the shard, not with N.

    The sampler fills 16 values at a time and draws tails shorter than 16 differently, so
    every chunk but the last holds a multiple of 16 values and the last at least 16.
    """
    rows = torch.as_tensor(rows, dtype=torch.int64)
    out = torch.empty(rows.shape[0], dim)
    order = torch.argsort(rows)
    ordered = rows[order]
    align = 16 // math.gcd(dim, 16)  # rows per 16-value boundary
    step = max(align, -(-chunk_rows // align) * align)
    starts = list(range(0, num_nodes, step))
    if len(starts) > 1 and (num_nodes - starts[-1]) * dim < 16:
        starts.pop()  # a short tail joins the chunk before it
    for start, end in zip(starts, starts[1:] + [num_nodes]):
        block = torch.randn(end - start, dim) * std
        lo, hi = torch.searchsorted(ordered, torch.tensor([start, end])).tolist()
        out[order[lo:hi]] = block[ordered[lo:hi] - start]
    return out


__all__ = ["EmbeddingMethod", "init_normal_rows", "init_normal_table", "score_rows"]
