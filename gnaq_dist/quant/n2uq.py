"""N2UQ baseline (Liu et al., CVPR 2022): non-uniform input thresholds, uniform output levels.

With ``n = 2^b - 1``, ``n`` learnable interval lengths ``a_1..a_n`` (kept positive by
softplus) and a learnable offset ``beta`` give the breakpoints ``p_0 = beta``,
``p_i = beta + a_1 + .. + a_i``. The piecewise-linear map ``F`` sends ``p_i`` to ``i``
(constant outside ``[p_0, p_n]``); the forward output is the uniform level
``y = round(F(w))`` in {0..n} (so the input thresholds, the segment midpoints, are
non-uniform), mapped back by a learnable affine ``x = offset + scale * y / n``.

Backward, the generalized straight-through estimator: gradients flow through ``F``
itself, so within segment i ``dx/dw = scale * (1/n) / a_i`` (slope ``(1/n)/a_i`` in the
normalised output ``y/n``; the method note's ``(2/n)/a_i`` is the same slope for an
output range of width 2), zero outside ``[p_0, p_n]``, and ``beta`` and every ``a_j``
get their gradient from ``F``'s dependence on the breakpoints.

Decisions where the method note is silent: breakpoints are initialised at the
``linspace(0.01, 0.99, n+1)`` quantiles of the warm-up table (a strided sample of at most
2^20 values, deterministic), and ``offset``/``scale`` by least squares of the table on
the initial levels ``y/n``, so the quantized start is the best affine fit. All of
``a, beta, offset, scale`` are shared by all nodes (dense parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gnaq_dist.quant.base import EmbeddingMethod, init_normal_table
from gnaq_dist.quant.packing import PackedTable, make_table

_MIN_INTERVAL = 1e-4
_QUANTILE_SAMPLE = 1 << 20


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class N2UQ(EmbeddingMethod):
    """Latent table (N, d) and 2^b - 1 learnable intervals; see the module docstring."""

    name = "n2uq"

    def __init__(self, num_nodes: int, dim: int, bits: int = 2, num_layers: int = 3) -> None:
        super().__init__(num_nodes, dim, num_layers)
        self.bits = int(bits)
        self.num_levels = 1 << self.bits
        self.n = self.num_levels - 1
        self.latent = torch.nn.Parameter(torch.zeros(num_nodes, dim))
        self.interval_raw = torch.nn.Parameter(torch.zeros(self.n))
        self.threshold_offset = torch.nn.Parameter(torch.zeros(()))
        self.out_offset = torch.nn.Parameter(torch.zeros(()))
        self.out_scale = torch.nn.Parameter(torch.ones(()))
        self.init_from_full_precision(init_normal_table(num_nodes, dim))

    # -- the quantizer ---------------------------------------------------------------
    def intervals(self) -> torch.Tensor:
        """a_1..a_n > 0."""
        return F.softplus(self.interval_raw) + _MIN_INTERVAL

    def breakpoints(self) -> torch.Tensor:
        """p_0..p_n (differentiable in beta and a)."""
        a = self.intervals()
        return torch.cat([self.threshold_offset.reshape(1), self.threshold_offset + torch.cumsum(a, 0)])

    def surrogate(self, w: torch.Tensor) -> torch.Tensor:
        """F(w) in [0, n]: piecewise linear through (p_i, i); differentiable in w, beta, a."""
        a = self.intervals()
        p = self.breakpoints()
        seg = torch.bucketize(w.detach(), p[1:-1].detach(), right=True)  # 0..n-1
        lo, hi = p[0], p[-1]
        wc = torch.minimum(torch.maximum(w, lo), hi)  # clip: zero gradient to w outside
        return seg.to(w.dtype) + (wc - p[seg]) / a[seg]

    def _levels_y(self, w: torch.Tensor) -> torch.Tensor:
        f = self.surrogate(w)
        y = torch.round(f.detach()).clamp_(0, self.n)
        return y + (f - f.detach())  # forward exactly y, backward dF

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return self.out_offset + self.out_scale * (y / self.n)

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids(ids)
        w = self.latent if ids is None else self.latent[ids]
        return self._output(self._levels_y(w))

    # -- initialisation --------------------------------------------------------------
    @torch.no_grad()
    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        e = self._check_weight(weight)
        self.latent.copy_(e)
        flat = e.reshape(-1)
        stride = max(1, flat.numel() // _QUANTILE_SAMPLE)
        sample = flat[::stride]
        qs = torch.linspace(0.01, 0.99, self.n + 1, device=e.device)
        p = torch.quantile(sample, qs)
        a = (p[1:] - p[:-1]).clamp(min=2 * _MIN_INTERVAL) - _MIN_INTERVAL
        self.threshold_offset.copy_(p[0])
        self.interval_raw.copy_(_inv_softplus(a))
        # Least-squares affine map of the initial levels y/n onto the table.
        t = torch.round(self.surrogate(e)).clamp_(0, self.n).reshape(-1) / self.n
        t_mean, e_mean = t.mean(), flat.mean()
        var = ((t - t_mean) ** 2).mean()
        scale = ((t - t_mean) * (flat - e_mean)).mean() / var if var > 0 else torch.ones(())
        self.out_scale.copy_(scale)
        self.out_offset.copy_(e_mean - scale * t_mean)

    # -- storage -----------------------------------------------------------------------
    def level_values(self) -> torch.Tensor:
        """(1, 1, 2^b): level j stands for offset + scale * j / n."""
        j = torch.arange(self.num_levels, dtype=torch.float32, device=self.latent.device)
        return self._output(j).reshape(1, 1, -1)

    @torch.no_grad()
    def pack(self, level_dtype: torch.dtype = torch.float16) -> PackedTable:
        y = torch.round(self.surrogate(self.latent)).clamp_(0, self.n)
        return make_table(self.name, self.bits, y.to(torch.uint8), self.level_values(), level_dtype)

    @torch.no_grad()
    def load_packed(self, table: PackedTable) -> None:
        """Output map from the stored levels; latent = breakpoint p_q of each code.

        The stored form has no thresholds, so they are kept as they are; putting each
        latent value on the breakpoint of its code makes ``round(F(w))`` re-derive the
        stored codes exactly.
        """
        self._check_table(table)
        dev = self.latent.device
        lv = torch.from_numpy(table.levels.astype("float32")).to(dev)[0, 0]
        self.out_offset.copy_(lv[0])
        self.out_scale.copy_(lv[-1] - lv[0])
        codes = torch.from_numpy(table.unpacked_codes()).to(dev).long()
        self.latent.copy_(self.breakpoints()[codes])

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        return [self.latent]

    def dense_params(self) -> list[torch.nn.Parameter]:
        return [self.interval_raw, self.threshold_offset, self.out_offset, self.out_scale]


__all__ = ["N2UQ"]
