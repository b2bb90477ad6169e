"""Row-sparse ("lazy") Adam for the embedding rows a worker owns.

Why not ``torch.optim.Adam``: a worker holds only its own rows and, in a step, receives
gradients for only the rows some rank's batch touched. Dense Adam would decay every
row's moments (and move every row on its momentum) each step, which needs a gradient
for all N rows. Lazy Adam changes only the touched rows: their moments, their values
and their own step count (bias correction per row, as DGL's ``SparseAdam``). Rows are
touched by the same global batches whatever the number of workers, so the algorithm is
the same for every W; it differs from ``local.py``'s dense Adam on rows that a step does
not touch.

The update of a touched row is torch's Adam (no weight decay, no amsgrad):
``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

The update runs in one pass over each touched row (numba, :func:`_fused_kernel`): torch's
elementwise form makes five temporaries the size of the touched rows and reads and writes
each of them (``benchmarks/bench_row_adam.py`` compares the two). Without numba the torch
form runs (the tests' reference).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.dequant_kernels import compile_with_numba


@functools.cache
def _fused_kernel() -> Any | None:
    """The compiled one-pass update, or None where numba is missing."""
    return compile_with_numba(_compile, "Adam's row updates")


def _compile(numba: Any, cache: bool) -> Any:
    @numba.njit(nogil=True, boundscheck=False, cache=cache)
    def adam_rows(p, m, v, g, rows, bc1, bc2_sqrt, b1, b2, one_minus_b1, one_minus_b2, lr, eps):  # pragma: no cover
        """Rows ``rows`` of (N, k) float32 ``p``, ``m``, ``v`` (every row in order where ``rows`` is
        empty) from (n, k) ``g``; ``bc1``, ``bc2_sqrt`` per row of ``g`` or one for all. float32
        throughout, in the order of the torch form's operations."""
        n, k = g.shape
        every, shared = rows.shape[0] == 0, bc1.shape[0] == 1
        for i in range(n):
            r = i if every else rows[i]
            c1 = bc1[0] if shared else bc1[i]
            c2 = bc2_sqrt[0] if shared else bc2_sqrt[i]
            for j in range(k):
                gj = g[i, j]
                mj = m[r, j] * b1 + one_minus_b1 * gj
                vj = v[r, j] * b2 + one_minus_b2 * (gj * gj)
                m[r, j] = mj
                v[r, j] = vj
                p[r, j] -= ((mj / c1) / (np.sqrt(vj) / c2 + eps)) * lr

    return adam_rows


class RowSparseAdam:
    """Adam state (two moments and a step count per row) for row parameters sharing one row index."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, fused: bool = True) -> None:
        if not params:
            raise GnaqInputError("RowSparseAdam needs at least one row parameter")
        rows = {int(p.shape[0]) for p in params}
        if len(rows) != 1:
            raise GnaqInputError(f"row parameters must have the same number of rows, got {sorted(rows)}")
        if lr <= 0:
            raise GnaqInputError(f"lr must be > 0, got {lr}")
        self.params = list(params)
        self.num_rows = rows.pop()
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.fused = fused  # one pass per row where numba runs it; False: torch's form (the reference)
        self.steps = torch.zeros(self.num_rows, dtype=torch.int64)
        self._moments: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def _state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The moments, made at the first step (or read): a phase that ends before its first
        step (the warm-up table of a run without warm-up) never holds 8 bytes a value of them."""
        if self._moments is None:
            self._moments = ([torch.zeros_like(p, dtype=torch.float32) for p in self.params],
                             [torch.zeros_like(p, dtype=torch.float32) for p in self.params])
        return self._moments

    def reserve(self) -> None:
        """Make the moments now, before a phase's steps (the training loop's reserve): their
        zeroed pages are setup's, not the first step's; and load the kernel (numba loads it at
        its first call, about half a second)."""
        self._state()
        kernel = _fused_kernel() if self.fused else None
        if kernel is not None:
            one, f = np.zeros((1, 1), dtype=np.float32), np.ones(1, dtype=np.float32)
            kernel(one, one.copy(), one.copy(), one.copy(), np.zeros(0, dtype=np.int64), f, f,
                   *(np.float32(0.5),) * 6)

    @property
    def exp_avg(self) -> list[torch.Tensor]:
        return self._state()[0]

    @property
    def exp_avg_sq(self) -> list[torch.Tensor]:
        return self._state()[1]

    def state_rows(self) -> int:
        """Rows of optimizer state held (equal to the owned rows)."""
        return int(self.steps.shape[0])

    def state_bytes(self) -> int:
        """Bytes of the state once made (two fp32 moments a value and a step count a row)."""
        return int(sum(2 * 4 * p.numel() for p in self.params) + self.steps.numel() * self.steps.element_size())

    @torch.no_grad()
    def step(self, rows: torch.Tensor | None, grads: list[torch.Tensor]) -> None:
        """Apply ``grads[i]`` (len(rows), width_i) to ``params[i][rows]``; ``rows`` unique local rows,
        or None for every row in order (a full-graph step touches them all): then the update runs
        in place, without gathering and scattering each table by row index."""
        if len(grads) != len(self.params):
            raise GnaqInputError(f"got {len(grads)} gradients for {len(self.params)} row parameters")
        if rows is None:
            if all(p.is_contiguous() for p in self.params):
                return self._step_all(grads)
            rows = torch.arange(self.num_rows)
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if rows.numel() == 0:
            return
        self.steps[rows] += 1
        t = self.steps[rows].to(torch.float64)
        bc1 = (1.0 - torch.pow(self.beta1, t)).to(torch.float32).unsqueeze(1)
        bc2_sqrt = (1.0 - torch.pow(self.beta2, t)).sqrt().to(torch.float32).unsqueeze(1)
        if self._fused(rows, grads, bc1, bc2_sqrt):
            return
        for p, m_all, v_all, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads):
            g = g.to(torch.float32).reshape(rows.shape[0], -1)
            m = m_all[rows].reshape(rows.shape[0], -1).mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            v = v_all[rows].reshape(rows.shape[0], -1).mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            m_all[rows] = m.reshape(m_all[rows].shape)
            v_all[rows] = v.reshape(v_all[rows].shape)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            update = (m / bc1) / denom * self.lr
            p.data[rows] -= update.reshape(p.data[rows].shape).to(p.dtype)

    def _step_all(self, grads: list[torch.Tensor]) -> None:
        """:meth:`step` on every row in order: the same arithmetic, in place."""
        self.steps += 1
        first = int(self.steps[0])
        same = bool((self.steps == first).all())
        t = torch.tensor([float(first)], dtype=torch.float64) if same else self.steps.to(torch.float64)
        bc1 = (1.0 - torch.pow(self.beta1, t)).to(torch.float32).unsqueeze(1)
        bc2_sqrt = (1.0 - torch.pow(self.beta2, t)).sqrt().to(torch.float32).unsqueeze(1)
        if self._fused(None, grads, bc1, bc2_sqrt):
            return
        n = self.num_rows
        for p, m_all, v_all, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads):
            g = g.to(torch.float32).reshape(n, -1)
            m = m_all.view(n, -1).mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            v = v_all.view(n, -1).mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            update = (m / bc1) / denom * self.lr
            p.data.view(n, -1).sub_(update.to(p.dtype))

    def _fused(self, rows: torch.Tensor | None, grads: list[torch.Tensor], bc1: torch.Tensor,
               bc2_sqrt: torch.Tensor) -> bool:
        """The update of ``rows`` (None: every row) in one pass per row; False (nothing done)
        where the kernel cannot run it: no numba, or a parameter not float32 and contiguous."""
        kernel = _fused_kernel() if self.fused else None
        if kernel is None or not all(p.dtype == torch.float32 and p.is_contiguous() for p in self.params):
            return False
        idx = (torch.empty(0, dtype=torch.int64) if rows is None else rows).numpy()
        f32 = np.float32
        consts = (f32(self.beta1), f32(self.beta2), f32(1.0 - self.beta1), f32(1.0 - self.beta2), f32(self.lr),
                  f32(self.eps))
        c1, c2 = bc1.reshape(-1).contiguous().numpy(), bc2_sqrt.reshape(-1).contiguous().numpy()
        for p, m_all, v_all, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads):
            n = int(p.shape[0])
            g = g.detach().to(torch.float32).reshape(idx.shape[0] if rows is not None else n, -1).contiguous()
            kernel(p.data.view(n, -1).numpy(), m_all.view(n, -1).numpy(), v_all.view(n, -1).numpy(), g.numpy(),
                   idx, c1, c2, *consts)
        return True


__all__ = ["RowSparseAdam"]
