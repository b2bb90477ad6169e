"""BiGeaR baseline (Chen et al., KDD 2022): 1-bit layer-wise binarization of LightGCN.

Layer-0 embeddings are a full-precision table; every layer output is binarized per row,
``Q(h) = sign(h) * mean_d |h|`` (sign(0) = +1), propagation continues from ``Q(H^l)``,
and the final representation is ``concat_l w_l Q(H^l)`` with ``w_l = (l+1)/(L+1)``.

Backward: ``sign`` is replaced by the Gaussian (Dirac-delta) approximation
``d sign(x)/dx ~ (2a/sqrt(pi)) exp(-(a x)^2)`` (``a/sqrt(pi) exp(-(ax)^2)`` approximates
the delta, and sign jumps by 2), times the row scale, plus the exact gradient through the
scale ``mean_d |h|``:
``dQ_j/dh_j' = alpha * delta_jj' * (2a/sqrt(pi)) exp(-(a h_j)^2) + sign(h_j) sign(h_j') / d``.
``a`` (option ``gaussian_a``, default 1.0) is absolute: LightGCN layer values are
O(0.1), where the bump is nearly flat, i.e. close to a scaled straight-through gradient.

The storage form holds the binarized embeddings of all L+1 layers (what inference
scores), which requires propagation: give the graph with ``graph=`` at construction or
``attach_graph``. The inference-time distillation of the paper is not implemented.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.base import EmbeddingMethod, init_normal_table
from gnaq_dist.quant.packing import PackedTable, make_table


def binarize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs in {-1, +1}, per-row scale mean|h| of shape (n, 1))."""
    sign = torch.where(h >= 0, torch.ones_like(h), -torch.ones_like(h))
    return sign, h.abs().mean(dim=1, keepdim=True)


class _BinarizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, a: float) -> torch.Tensor:  # type: ignore[override]
        sign, alpha = binarize_rows(h)
        ctx.save_for_backward(h, sign, alpha)
        ctx.a = a
        return sign * alpha

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        h, sign, alpha = ctx.saved_tensors
        a = ctx.a
        dsign = (2.0 * a / math.sqrt(math.pi)) * torch.exp(-((a * h) ** 2))
        through_sign = grad * alpha * dsign
        through_scale = (grad * sign).sum(dim=1, keepdim=True) * sign / h.shape[1]
        return through_sign + through_scale, None


class BiGeaR(EmbeddingMethod):
    """fp layer-0 table; binarized layers; weighted concatenation. 1-bit only."""

    name = "bigear"
    bits = 1

    def __init__(self, num_nodes: int, dim: int, num_layers: int = 3, gaussian_a: float = 1.0, graph=None) -> None:
        super().__init__(num_nodes, dim, num_layers)
        if not gaussian_a > 0:
            raise GnaqInputError(f"gaussian_a must be > 0, got {gaussian_a}")
        self.gaussian_a = float(gaussian_a)
        self.weight = torch.nn.Parameter(init_normal_table(num_nodes, dim))
        self._graph = None
        self._loaded: PackedTable | None = None
        if graph is not None:
            self.attach_graph(graph)

    def attach_graph(self, graph) -> None:
        """The BipartiteGraph that ``pack`` propagates over."""
        if graph.n_nodes != self.num_nodes:
            raise GnaqInputError(f"graph has {graph.n_nodes} nodes, the table {self.num_nodes}")
        self._graph = graph

    def layer_weights(self, num_layers: int | None = None) -> list[float]:
        L = self.num_layers if num_layers is None else num_layers
        return [(l + 1) / (L + 1) for l in range(L + 1)]

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids(ids)
        if torch.is_grad_enabled():
            self._loaded = None  # training moves the weights away from a loaded table
        return self.weight if ids is None else self.weight[ids]

    def layer_fn(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return _BinarizeFunction.apply(h, self.gaussian_a)

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """concat_l (l+1)/(L+1) * Q(H^l), with L+1 = len(layers)."""
        if not layers:
            raise GnaqInputError("combine needs at least one layer")
        weights = self.layer_weights(len(layers) - 1)
        return torch.cat([w * q for w, q in zip(weights, layers)], dim=1)

    def refine(self, ids: torch.Tensor, propagated: torch.Tensor) -> None:
        return None

    @torch.no_grad()
    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        self.weight.copy_(self._check_weight(weight))
        self._loaded = None

    @torch.no_grad()
    def binarized_layers(self) -> list[torch.Tensor]:
        """[Q(H^0) .. Q(H^L)] of all nodes, by full-graph propagation."""
        if self._graph is None:
            raise GnaqInputError("bigear needs the graph to pack: build_method(..., graph=g) or attach_graph(g)")
        from gnaq_dist.propagation import propagate_full

        return propagate_full(self._graph, self.weight, self.num_layers, self.layer_fn)

    @torch.no_grad()
    def pack(self, level_dtype: torch.dtype = torch.float16) -> PackedTable:
        """L+1 groups of 1-bit codes with per-row levels {-alpha_l, +alpha_l}.

        A table given to ``load_packed`` is returned as is until the next training forward
        or re-initialisation: the packed form has no fp table to propagate.
        """
        if self._loaded is not None:
            return self._loaded
        layers = self.binarized_layers()
        codes = torch.cat([(q >= 0).to(torch.uint8) for q in layers], dim=1)
        alphas = torch.stack([q.abs().amax(dim=1) for q in layers], dim=1)  # |Q| is alpha on every entry
        levels = torch.stack([-alphas, alphas], dim=2)  # (N, L+1, 2): code 0 -> -alpha, 1 -> +alpha
        return make_table(
            self.name, 1, codes, levels, level_dtype, groups=len(layers), needs_propagation=False,
            group_weights=self.layer_weights(len(layers) - 1),
        )

    def load_packed(self, table: PackedTable) -> None:
        """Keep the binarized layers for inference; the fp table is not in storage.

        The layer-0 group is also copied into the fp weight (its best stand-in), but a
        BiGeaR training run resumes from a state_dict, not from a packed table.
        """
        self._check_table(table, groups=self.num_layers + 1)
        self._loaded = table
        x0 = table.dequantize()[:, : self.dim]
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.ascontiguousarray(x0)).to(self.weight.device))

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        return [self.weight]


__all__ = ["BiGeaR", "binarize_rows"]
