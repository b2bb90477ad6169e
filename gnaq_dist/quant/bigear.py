"""BiGeaR (Chen et al., KDD 2022) as its authors' code runs it: 1-bit scoring of every layer.

Propagation stays in full precision: ``H^0`` is an fp32 table, ``H^(l+1) = A_hat H^l``.
Only the scoring representation is binarized, layer by layer and per row,
``Q(h) = sign(h) * mean_d |h|`` (sign(0) = +1, as the stored code must be one of two), and
concatenated with the weights ``w_l = (l+1)/(L+1)``: ``concat_l w_l Q(H^l)``. So
``layer_fn`` is the identity and :meth:`BiGeaR.combine` binarizes.

Backward (their ``Normal_Ddelta``): the gradient of ``Q`` w.r.t. ``h`` is
``clamp((a/sqrt(pi)) exp(-(a h)^2), 1e-8, 1)`` element-wise (a Gaussian stand-in for the
Dirac delta), with no term through the row scale; ``a`` is option ``gaussian_a`` (their
``norm_a``, default 1).

Inference distillation (their ``_ID_loss``): the teacher is the fp model the quantized
phase starts from (``init_from_full_precision``). For each layer ``l`` and user ``u`` its
top-R items by ``<H^l_u, H^l_i>`` (R = 100, no item masked) are ranked once; each step
adds ``mean_l mean_u mean_r exp(-0.1 (r+1)) softplus(-s_lur)``, with ``s_lur`` the
student's layer-``l`` score ``<w_l Q(H^l_u), w_l Q(H^l_t)>`` of the teacher's r-th item ``t``,
the mean over the batch's positives (one user each). :meth:`BiGeaR.extra_loss` gives it in
closed form. The teacher's layer-0 table is a row buffer, so a checkpoint resumes with it.

The storage form holds the binarized embeddings of all L+1 layers (what inference scores):
give the graph with ``graph=`` at construction or ``attach_graph``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.base import EmbeddingMethod, init_normal_table
from gnaq_dist.quant.dequant_kernels import compile_with_numba
from gnaq_dist.quant.packing import PackedTable, make_table

#: Teacher items distilled per user and layer (their ``--R``).
DISTILL_TOP_R = 100
#: Rank decay of the distillation weights ``exp(-decay (r+1))`` (their ``--lmd2``).
DISTILL_DECAY = 0.1
#: Bounds of the backward's Gaussian factor (their clamp).
GRAD_CLAMP = (1e-8, 1.0)


def binarize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs in {-1, +1}, per-row scale mean|h| of shape (n, 1))."""
    sign = torch.where(h >= 0, torch.ones_like(h), -torch.ones_like(h))
    return sign, h.abs().mean(dim=1, keepdim=True)


class _BinarizeFunction(torch.autograd.Function):
    """``sign(h) * mean|h|`` forward; ``grad * clamp(a/sqrt(pi) exp(-(a h)^2))`` backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, a: float) -> torch.Tensor:  # type: ignore[override]
        sign, alpha = binarize_rows(h)
        ctx.save_for_backward(h)
        ctx.a = a
        return sign * alpha

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        a = ctx.a
        factor = (a / math.sqrt(math.pi)) * torch.exp(-((a * h) ** 2))
        return grad * factor.clamp(*GRAD_CLAMP), None


def binarize(h: torch.Tensor, a: float = 1.0) -> torch.Tensor:
    """``Q(h)`` with BiGeaR's backward (differentiable in ``h``)."""
    return _BinarizeFunction.apply(h, a)


def distillation_weights(top_r: int, decay: float = DISTILL_DECAY) -> torch.Tensor:
    """``exp(-decay (r+1))`` for ranks r = 0 .. top_r-1."""
    return torch.exp(-decay * torch.arange(1, top_r + 1, dtype=torch.float32))


@torch.no_grad()
def teacher_ranks(layers: list[torch.Tensor], n_users: int, top_r: int, chunk: int = 1024) -> torch.Tensor:
    """(n_users, L+1, R) int32: each layer's top-R items (item index, best first) of every user
    by ``<H^l_u, H^l_i>`` over all items, from the teacher's fp layers [(N, d)]."""
    n_items = layers[0].shape[0] - n_users
    r = min(top_r, n_items)
    out = torch.empty((n_users, len(layers), r), dtype=torch.int32)
    for l, h in enumerate(layers):
        items = h[n_users:]
        for start in range(0, n_users, chunk):
            scores = h[start:min(start + chunk, n_users)] @ items.T
            out[start:start + chunk, l] = scores.topk(r, dim=1).indices.to(torch.int32)
    return out


@functools.lru_cache(maxsize=None)
def _kernel() -> Any | None:
    """The fused distillation kernel (one pass over (user, layer, rank), no (C, R, d)
    temporaries), or None without numba."""
    return compile_with_numba(_compile, "the BiGeaR distillation kernel")


def _compile(numba: Any, cache: bool) -> Any:
    @numba.njit(nogil=True, boundscheck=False, fastmath=True, cache=cache)
    def distill(final, users, coef, ranks, w, n_users, dim, grad):  # pragma: no cover - compiled
        n_layers, top_r = ranks.shape[1], ranks.shape[2]
        total = 0.0
        gu = np.empty(dim, dtype=np.float32)
        for c in range(users.shape[0]):
            u = users[c]
            for l in range(n_layers):
                off = l * dim
                for j in range(dim):
                    gu[j] = 0.0
                for r in range(top_r):
                    t = n_users + ranks[c, l, r]
                    s = np.float32(0.0)
                    for j in range(dim):
                        s += final[u, off + j] * final[t, off + j]
                    k = coef[c] * w[r]
                    # softplus(-s) and sigmoid(-s), stable for either sign of s
                    if s > 0:
                        e = math.exp(-s)
                        total += k * math.log1p(e)
                        ds = np.float32(-k * e / (1.0 + e))
                    else:
                        e = math.exp(s)
                        total += k * (-s + math.log1p(e))
                        ds = np.float32(-k / (1.0 + e))
                    for j in range(dim):
                        gu[j] += ds * final[t, off + j]
                        grad[t, off + j] += ds * final[u, off + j]
                for j in range(dim):
                    grad[u, off + j] += gu[j]
        return total

    return distill


def distillation_into(final: torch.Tensor, users: torch.Tensor, ranks: torch.Tensor, n_users: int,
                      grad: torch.Tensor, decay: float = DISTILL_DECAY, chunk: int = 1024,
                      fused: bool = True) -> float:
    """BiGeaR's inference-distillation loss of the batch's ``users`` (B,), one per positive;
    its gradient w.r.t. ``final`` (N, (L+1) d: the weighted binarized layers) is added into ``grad``.

    ``loss = 1/(L+1) sum_l 1/B sum_b 1/R sum_r w_r softplus(-<f^l_u, f^l_t>)`` with ``u`` the
    b-th user, ``t`` the teacher's r-th item of ``u`` at layer l (``ranks``, from
    :func:`teacher_ranks`) and ``f^l`` the layer-l slice of the final rows. Computed per
    distinct user (weighted by its count): with numba (``fused``) one pass that holds one
    user's rows at a time, in torch ``chunk`` users at a time."""
    final = final.detach()
    n_layers, top_r = int(ranks.shape[1]), int(ranks.shape[2])
    dim = final.shape[1] // n_layers
    if final.shape[1] != n_layers * dim:
        raise GnaqInputError(f"final rows of width {final.shape[1]} do not split into {n_layers} layers")
    b = int(users.shape[0])
    if b == 0:
        return 0.0
    distinct, counts = torch.unique(users.to(torch.int64), return_counts=True)
    w = distillation_weights(top_r, decay).to(final.dtype)
    kernel = _kernel() if fused else None
    if kernel is not None and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                                  for t in (final, grad)):
        coef = (counts.to(torch.float64) / (b * top_r * n_layers)).numpy()
        rows = np.ascontiguousarray(ranks[distinct].numpy())
        return float(kernel(final.numpy(), distinct.numpy(), coef, rows, w.to(torch.float64).numpy(), n_users,
                            dim, grad.numpy()))
    total = 0.0
    for l in range(n_layers):
        cols = slice(l * dim, (l + 1) * dim)
        f = final[:, cols].contiguous()  # row gathers and index_add on strided slices are several times slower
        g = torch.zeros_like(f)
        for start in range(0, distinct.shape[0], chunk):
            u = distinct[start:start + chunk]
            c = counts[start:start + chunk].to(final.dtype)
            t = ranks[u, l].to(torch.int64) + n_users  # (C, R) node ids
            fu = f.index_select(0, u)  # (C, d)
            ft = f.index_select(0, t.reshape(-1)).view(t.shape[0], top_r, dim)  # (C, R, d); faster than f[t]
            s = torch.einsum("cd,crd->cr", fu, ft)
            coef = (c / (b * top_r * n_layers)).unsqueeze(1) * w  # (C, R)
            total += float((coef * torch.nn.functional.softplus(-s)).sum())
            ds = -coef * torch.sigmoid(-s)  # d loss / d s
            g.index_add_(0, u, torch.einsum("cr,crd->cd", ds, ft))
            g.index_add_(0, t.reshape(-1), (ds.unsqueeze(2) * fu.unsqueeze(1)).reshape(-1, dim))
        grad[:, cols] += g
    return total


class BiGeaR(EmbeddingMethod):
    """fp layer-0 table and fp propagation; binarized, weighted, concatenated layers; 1-bit only."""

    name = "bigear"
    bits = 1

    def __init__(self, num_nodes: int, dim: int, num_layers: int = 3, gaussian_a: float = 1.0, graph=None,
                 top_r: int = DISTILL_TOP_R) -> None:
        super().__init__(num_nodes, dim, num_layers)
        if not gaussian_a > 0:
            raise GnaqInputError(f"gaussian_a must be > 0, got {gaussian_a}")
        if top_r < 1:
            raise GnaqInputError(f"top_r must be >= 1, got {top_r}")
        self.gaussian_a = float(gaussian_a)
        self.top_r = int(top_r)
        self.weight = torch.nn.Parameter(init_normal_table(num_nodes, dim))
        self.register_buffer("teacher", torch.zeros(num_nodes, dim))  # the fp table the phase started from
        self._ranks: torch.Tensor | None = None  # teacher_ranks of ``teacher``, made when first needed
        self._graph = None
        self._loaded: PackedTable | None = None
        if graph is not None:
            self.attach_graph(graph)

    def attach_graph(self, graph) -> None:
        """The BipartiteGraph that ``pack`` and the teacher's ranking propagate over."""
        if graph.n_nodes != self.num_nodes:
            raise GnaqInputError(f"graph has {graph.n_nodes} nodes, the table {self.num_nodes}")
        self._graph = graph

    def _need_graph(self, what: str):
        if self._graph is None:
            raise GnaqInputError(f"bigear needs the graph to {what}: build_method(..., graph=g) or attach_graph(g)")
        return self._graph

    def layer_weights(self, num_layers: int | None = None) -> list[float]:
        L = self.num_layers if num_layers is None else num_layers
        return [(l + 1) / (L + 1) for l in range(L + 1)]

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids(ids)
        if torch.is_grad_enabled():
            self._loaded = None  # training moves the weights away from a loaded table
        return self.weight if ids is None else self.weight[ids]

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """concat_l (l+1)/(L+1) * Q(H^l) of the fp layers, with L+1 = len(layers)."""
        if not layers:
            raise GnaqInputError("combine needs at least one layer")
        weights = self.layer_weights(len(layers) - 1)
        return torch.cat([w * binarize(h, self.gaussian_a) for w, h in zip(weights, layers)], dim=1)

    @torch.no_grad()
    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        """Start from the warm-up table, which is also the distillation's teacher."""
        w = self._check_weight(weight)
        self.weight.copy_(w)
        self.teacher.copy_(w)
        self._ranks = None
        self._loaded = None

    def ranks(self) -> torch.Tensor:
        """The teacher's top-R items per user and layer (:func:`teacher_ranks`), made once."""
        if self._ranks is None:
            from gnaq_dist.propagation import propagate_full

            graph = self._need_graph("rank the teacher's items")
            layers = propagate_full(graph, self.teacher.detach(), self.num_layers)
            self._ranks = teacher_ranks(layers, graph.n_users, self.top_r)
        return self._ranks

    def extra_loss(self, final: torch.Tensor, users: torch.Tensor, grad: torch.Tensor) -> float:
        """The inference distillation (:func:`distillation_into`) on the final rows of all nodes."""
        if final.shape[0] != self.num_nodes:
            raise GnaqInputError(f"bigear's distillation needs the final rows of all {self.num_nodes} nodes, "
                                 f"got {final.shape[0]} (schedule.propagation must be full)")
        return distillation_into(final, users, self.ranks(), self._need_graph("distill").n_users, grad)

    @torch.no_grad()
    def binarized_layers(self) -> list[torch.Tensor]:
        """[Q(H^0) .. Q(H^L)] of all nodes, by full-graph fp propagation."""
        from gnaq_dist.propagation import propagate_full

        layers = propagate_full(self._need_graph("pack"), self.weight, self.num_layers)
        return [binarize(h) for h in layers]

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
        BiGeaR training run resumes from a checkpoint, not from a packed table.
        """
        self._check_table(table, groups=self.num_layers + 1)
        self._loaded = table
        x0 = table.dequantize()[:, : self.dim]
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.ascontiguousarray(x0)).to(self.weight.device))

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        return [self.weight]

    def row_buffers(self) -> list[torch.Tensor]:
        return [self.teacher]


__all__ = ["BiGeaR", "binarize", "binarize_rows", "distillation_into", "distillation_weights", "teacher_ranks"]
