"""LSQ baseline (Esser et al. 2019): a uniform grid with a learned step size.

``v_hat = round(clip(w/s, -Q_N, Q_P)) * s`` over a latent fp table ``w``. Backward, as
in the paper: straight-through to ``w`` inside the clip range, zero outside; to ``s``
``(-w/s + round(w/s))`` inside, ``-Q_N`` / ``Q_P`` outside, times upstream gradient,
scaled by ``g = 1/sqrt(n_w * Q_P)``.

Decisions where the method note is silent:

* b >= 2: ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1`` (signed grid). b = 1 would give
  ``Q_P = 0`` (levels {-s, 0} and an infinite gradient scale), so 1-bit LSQ is binary
  ``{-s, +s}``: ``v_hat = s * sign(w)`` (sign(0) = +1), i.e. ``Q_N = Q_P = 1`` with
  rounding to the nearest of {-1, +1}; its step gradient is ``-w/s + sign(w)`` for
  ``|w/s| <= 1`` and ``sign(w)`` outside; ``w`` is straight-through inside.
* ``n_w`` in ``g`` is the size of the whole table (N*d, or d with ``per_row``), not of
  the rows of one batch, so that the scale does not change with the batch.
* Init: ``s = 2 mean|w| / sqrt(Q_P)`` (the paper's); per row with ``per_row=True``.
"""

from __future__ import annotations

import math

import torch

from gnaq_dist.quant.base import EmbeddingMethod, init_normal_table
from gnaq_dist.quant.packing import PackedTable, make_table


def lsq_bounds(bits: int) -> tuple[int, int]:
    """(Q_N, Q_P) of the grid; see the module docstring for b = 1."""
    if bits == 1:
        return 1, 1
    return 1 << (bits - 1), (1 << (bits - 1)) - 1


def _integer_codes(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed grid index round(clip(w/s)) as float (b = 1: sign in {-1, +1})."""
    q_n, q_p = lsq_bounds(bits)
    v = w / s
    if bits == 1:
        return torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v))
    return torch.round(v.clamp(-q_n, q_p))


class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, bits: int, grad_scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w, s)
        ctx.bits = bits
        ctx.grad_scale = grad_scale
        return _integer_codes(w, s, bits) * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w, s = ctx.saved_tensors
        q_n, q_p = lsq_bounds(ctx.bits)
        v = w / s
        below = v < -q_n
        above = v > q_p
        inside = ~(below | above)
        rounded = _integer_codes(w, s, ctx.bits)
        ds_elem = torch.where(inside, rounded - v, torch.where(below, -float(q_n), float(q_p)) * torch.ones_like(v))
        grad_w = grad * inside.to(grad.dtype)
        contrib = grad * ds_elem * ctx.grad_scale
        if s.numel() == 1:
            grad_s = contrib.sum().reshape(s.shape)
        else:  # per-row steps (n, 1)
            grad_s = contrib.sum(dim=1, keepdim=True)
        return grad_w, grad_s, None, None


class LSQ(EmbeddingMethod):
    """Latent table (N, d) and a learned step (per tensor, or per row with ``per_row``)."""

    name = "lsq"

    def __init__(self, num_nodes: int, dim: int, bits: int = 2, num_layers: int = 3, per_row: bool = False) -> None:
        super().__init__(num_nodes, dim, num_layers)
        self.bits = int(bits)
        self.num_levels = 1 << self.bits
        self.per_row = bool(per_row)
        self.q_n, self.q_p = lsq_bounds(self.bits)
        self.latent = torch.nn.Parameter(torch.zeros(num_nodes, dim))
        self.step = torch.nn.Parameter(torch.ones(num_nodes, 1) if self.per_row else torch.ones(1))
        self.init_from_full_precision(init_normal_table(num_nodes, dim))

    def _grad_scale(self) -> float:
        n_w = self.dim if self.per_row else self.num_nodes * self.dim
        return 1.0 / math.sqrt(n_w * self.q_p)

    def _rows(self, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.latent if ids is None else self.latent[ids]
        s = self.step if not self.per_row or ids is None else self.step[ids]
        return w, s

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        w, s = self._rows(self._ids(ids))
        return _LSQFunction.apply(w, s, self.bits, self._grad_scale())

    @torch.no_grad()
    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        e = self._check_weight(weight)
        self.latent.copy_(e)
        mean_abs = e.abs().mean(dim=1, keepdim=True) if self.per_row else e.abs().mean().reshape(1)
        s = 2.0 * mean_abs / math.sqrt(self.q_p)
        self.step.copy_(torch.where(s > 0, s, torch.full_like(s, 1e-3)))  # an all-zero row must not give s = 0

    def level_values(self) -> torch.Tensor:
        """(N or 1, 1, 2^b): code j stands for (j - Q_N) * s (b = 1: (2j - 1) * s)."""
        j = torch.arange(self.num_levels, dtype=torch.float32, device=self.step.device)
        grid = 2 * j - 1 if self.bits == 1 else j - self.q_n
        s = self.step.reshape(-1, 1)
        return (grid.unsqueeze(0) * s).unsqueeze(1)

    @torch.no_grad()
    def pack(self, level_dtype: torch.dtype = torch.float16) -> PackedTable:
        ints = _integer_codes(self.latent, self.step, self.bits)
        codes = ((ints + 1) / 2) if self.bits == 1 else ints + self.q_n
        return make_table(self.name, self.bits, codes.to(torch.uint8), self.level_values(), level_dtype)

    @torch.no_grad()
    def load_packed(self, table: PackedTable) -> None:
        """Step from the stored grid (the +1 level), latent = the dequantized values."""
        self._check_table(table)
        dev = self.step.device
        lv = torch.from_numpy(table.levels.astype("float32")).to(dev)[:, 0, :]
        s = lv[:, 1] if self.bits == 1 else lv[:, self.q_n + 1]  # the level that stands for +1 * s
        self.step.copy_(s.reshape(self.step.shape) if self.per_row else s[:1].reshape(1))
        self.latent.copy_(torch.from_numpy(table.dequantize()).to(dev))

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        return [self.latent, self.step] if self.per_row else [self.latent]

    def dense_params(self) -> list[torch.nn.Parameter]:
        return [] if self.per_row else [self.step]


__all__ = ["LSQ", "lsq_bounds"]
