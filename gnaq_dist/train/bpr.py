"""BPR over a step's positives: the loss and its gradient w.r.t. the final rows, in closed form.

Why: one propagation serves a large batch, so the loss must not hold (positives x negatives x d)
at once. numba scores one positive at a time (torch, without it, a bounded chunk) and adds
the gradient into tables shaped like the final rows, which the caller back-propagates once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.dequant_kernels import compile_with_numba


@functools.lru_cache(maxsize=None)
def _kernel() -> Any | None:
    """The fused per-positive kernel (one pass, no (B, k, d) temporaries), or None without numba."""
    return compile_with_numba(_compile, "the BPR loss kernel")


def _compile(numba: Any, cache: bool) -> Any:
    @numba.njit(nogil=True, boundscheck=False, fastmath=True, cache=cache)
    def bpr(uf, itf, users, pos, neg, inv_denom, gu_out, gi_out):  # pragma: no cover - compiled
        n, k = neg.shape
        d = uf.shape[1]
        total = 0.0
        gu = np.empty(d, dtype=np.float32)
        for i in range(n):
            u, p = users[i], pos[i]
            sp = np.float32(0.0)
            for j in range(d):
                sp += uf[u, j] * itf[p, j]
                gu[j] = 0.0
            g_sum = np.float32(0.0)
            for c in range(k):
                q = neg[i, c]
                sq = np.float32(0.0)
                for j in range(d):
                    sq += itf[q, j] * uf[u, j]
                diff = sq - sp
                # softplus and sigmoid, stable for either sign of diff
                if diff > 0:
                    e = math.exp(-diff)
                    total += diff + math.log1p(e)
                    g = np.float32(inv_denom / (1.0 + e))
                else:
                    e = math.exp(diff)
                    total += math.log1p(e)
                    g = np.float32(inv_denom * e / (1.0 + e))
                g_sum += g
                for j in range(d):
                    gu[j] += g * itf[q, j]
                    gi_out[q, j] += g * uf[u, j]
            for j in range(d):
                gi_out[p, j] -= g_sum * uf[u, j]
                gu_out[u, j] += gu[j] - g_sum * itf[p, j]
        return total

    return bpr


class BatchRows(NamedTuple):
    """A batch's distinct nodes and, for every occurrence, its index among them."""

    nodes: torch.Tensor  # sorted distinct node ids
    counts: torch.Tensor  # occurrences of each in the batch (L2 weights)
    users: torch.Tensor  # (B,) indices into nodes
    pos: torch.Tensor  # (B,)
    neg: torch.Tensor  # (B, k)


def batch_rows(users: torch.Tensor, pos_nodes: torch.Tensor, neg_nodes: torch.Tensor) -> BatchRows:
    """One ``unique`` with its inverse: cheaper than a ``searchsorted`` of every occurrence."""
    b = int(users.shape[0])
    nodes, inverse, counts = torch.unique(torch.cat([users, pos_nodes, neg_nodes.reshape(-1)]),
                                          return_inverse=True, return_counts=True)
    return BatchRows(nodes, counts, inverse[:b], inverse[b:2 * b], inverse[2 * b:].reshape(b, -1))


def bpr_row_gradient(final: torch.Tensor, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                     denom: float, chunk: int | None = None, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, grad)`` of ``sum softplus(<u, n_k> - <u, p>) / denom`` over the positives.

    ``users``, ``pos`` (B,) and ``neg`` (B, k) are row indices into ``final`` (n, d);
    ``grad`` is (n, d), the loss's gradient w.r.t. ``final``. With numba (``fused``) one pass
    holds one positive's rows at a time; in torch, ``chunk`` positives are scored at a time
    (None: all at once). The result depends on neither beyond float rounding.
    """
    final = final.detach().contiguous()
    grad = torch.zeros_like(final)
    loss = bpr_into(final, final, users, pos, neg, denom, grad, grad, chunk, fused)
    return loss, grad


def bpr_into(user_rows: torch.Tensor, item_rows: torch.Tensor, users: torch.Tensor, pos: torch.Tensor,
             neg: torch.Tensor, denom: float, user_grad: torch.Tensor, item_grad: torch.Tensor,
             chunk: int | None = None, fused: bool = True) -> torch.Tensor:
    """The loss of :func:`bpr_row_gradient` with users' rows and items' rows in two tables
    (``users`` index ``user_rows``, ``pos`` and ``neg`` index ``item_rows``); the gradients are
    added into ``user_grad`` and ``item_grad`` (shaped like the tables; they may be one tensor
    when the tables are one)."""
    if neg.dim() != 2 or neg.shape[0] != users.shape[0] or pos.shape != users.shape:
        raise GnaqInputError("users, pos must be (B,) and neg (B, k) with the same B")
    if chunk is not None and chunk < 1:
        raise GnaqInputError(f"chunk must be >= 1 or None, got {chunk}")
    user_rows, item_rows = user_rows.detach(), item_rows.detach()
    cpu32 = all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                for t in (user_rows, item_rows, user_grad, item_grad))
    kernel = _kernel() if fused and cpu32 else None
    if kernel is not None:
        total = kernel(user_rows.numpy(), item_rows.numpy(), users.numpy(), pos.numpy(),
                       np.ascontiguousarray(neg.numpy()), 1.0 / denom, user_grad.numpy(), item_grad.numpy())
        return torch.tensor(total / denom, dtype=user_rows.dtype)
    total = torch.zeros((), dtype=torch.float64)
    n = int(users.shape[0])
    step = n if chunk is None else int(chunk)
    d = user_rows.shape[1]
    for start in range(0, n, max(step, 1)):
        u_ids, p_ids, n_ids = users[start:start + step], pos[start:start + step], neg[start:start + step]
        u, p, q = user_rows[u_ids], item_rows[p_ids], item_rows[n_ids]  # (c, d), (c, d), (c, k, d)
        diff = torch.bmm(q, u.unsqueeze(2)).squeeze(2) - (u * p).sum(1, keepdim=True)  # (c, k)
        total += F.softplus(diff).sum(dtype=torch.float64)
        g = torch.sigmoid(diff).div_(denom)  # d loss / d <u, n_k>
        g_sum = g.sum(1, keepdim=True)
        user_grad.index_add_(0, u_ids, torch.bmm(g.unsqueeze(1), q).squeeze(1) - g_sum * p)
        item_grad.index_add_(0, p_ids, -g_sum * u)
        item_grad.index_add_(0, n_ids.reshape(-1), (g.unsqueeze(2) * u.unsqueeze(1)).reshape(-1, d))
    return (total / denom).to(user_rows.dtype)


__all__ = ["BatchRows", "batch_rows", "bpr_into", "bpr_row_gradient"]
