"""BPR over a step's positives in bounded chunks: the loss and its gradient w.r.t. the final rows.

Why: one propagation serves a large batch, so the loss must not hold (positives x negatives x d)
at once. Each chunk's gradient is written in closed form into one buffer shaped like the final
rows, which the caller then back-propagates through the propagation once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gnaq_dist.errors import GnaqInputError


def bpr_row_gradient(final: torch.Tensor, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                     denom: float, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, grad)`` of ``sum softplus(<u, n_k> - <u, p>) / denom`` over the positives.

    ``users``, ``pos`` (B,) and ``neg`` (B, k) are row indices into ``final`` (n, d);
    ``grad`` is (n, d), the loss's gradient w.r.t. ``final``. ``chunk`` positives are scored
    at a time (None: all at once); the result does not depend on it beyond float rounding.
    """
    if neg.dim() != 2 or neg.shape[0] != users.shape[0] or pos.shape != users.shape:
        raise GnaqInputError("users, pos must be (B,) and neg (B, k) with the same B")
    if chunk is not None and chunk < 1:
        raise GnaqInputError(f"chunk must be >= 1 or None, got {chunk}")
    final = final.detach()
    grad = torch.zeros_like(final)
    total = torch.zeros((), dtype=torch.float64)
    n = int(users.shape[0])
    step = n if chunk is None else int(chunk)
    d = final.shape[1]
    for start in range(0, n, max(step, 1)):
        u_ids, p_ids, n_ids = users[start:start + step], pos[start:start + step], neg[start:start + step]
        u, p, q = final[u_ids], final[p_ids], final[n_ids]  # (c, d), (c, d), (c, k, d)
        diff = torch.bmm(q, u.unsqueeze(2)).squeeze(2) - (u * p).sum(1, keepdim=True)  # (c, k)
        total += F.softplus(diff).sum(dtype=torch.float64)
        g = torch.sigmoid(diff).div_(denom)  # d loss / d <u, n_k>
        g_sum = g.sum(1, keepdim=True)
        grad.index_add_(0, u_ids, torch.bmm(g.unsqueeze(1), q).squeeze(1) - g_sum * p)
        grad.index_add_(0, p_ids, -g_sum * u)
        grad.index_add_(0, n_ids.reshape(-1), (g.unsqueeze(2) * u.unsqueeze(1)).reshape(-1, d))
    return (total / denom).to(final.dtype), grad


__all__ = ["bpr_row_gradient"]
