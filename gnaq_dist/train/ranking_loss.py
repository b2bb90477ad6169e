"""The ranking loss over a step's positives and its gradient w.r.t. the final rows, in closed form.

Two losses over each positive's k sampled negatives: ``bpr`` (mean softplus of negative minus
positive score over every pair) and ``softmax`` (sampled softmax: the positive's mean cross-entropy
among itself and its negatives, scores divided by a temperature; its gradient weighs each negative
by how close it scores, so hard negatives keep teaching after the easy ones are learnt).
Why closed form: one propagation serves a large batch, so the loss must not hold
(positives x negatives x d) at once. numba scores one positive at a time (torch, without it, a
bounded chunk) and adds the gradient into tables shaped like the final rows, which the caller
back-propagates once.
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


LOSSES = ("bpr", "softmax")


@functools.lru_cache(maxsize=None)
def _kernel(loss: str) -> Any | None:
    """The fused per-positive kernel of ``loss`` (one pass, no (B, k, d) temporaries), or None without numba."""
    compile_fn = _compile_bpr if loss == "bpr" else _compile_softmax
    return compile_with_numba(compile_fn, f"the {loss} loss kernel")


def _compile_bpr(numba: Any, cache: bool) -> Any:
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


def _compile_softmax(numba: Any, cache: bool) -> Any:
    @numba.njit(nogil=True, boundscheck=False, fastmath=True, cache=cache)
    def softmax(uf, itf, users, pos, neg, inv_t, inv_denom, gu_out, gi_out):  # pragma: no cover - compiled
        n, k = neg.shape
        d = uf.shape[1]
        total = 0.0
        z = np.empty(k, dtype=np.float32)
        gu = np.empty(d, dtype=np.float32)
        for i in range(n):
            u, p = users[i], pos[i]
            zp = np.float32(0.0)
            for j in range(d):
                zp += uf[u, j] * itf[p, j]
            zp *= inv_t
            top = zp
            for c in range(k):
                q = neg[i, c]
                s = np.float32(0.0)
                for j in range(d):
                    s += itf[q, j] * uf[u, j]
                z[c] = s * inv_t
                top = max(top, z[c])
            ep = math.exp(zp - top)
            norm = ep
            for c in range(k):
                z[c] = math.exp(z[c] - top)
                norm += z[c]
            total += math.log(norm) + top - zp
            # d loss / d score: (softmax - onehot(positive)) / temperature / denom
            scale = inv_t * inv_denom / norm
            wp = np.float32(scale * ep - inv_t * inv_denom)
            for j in range(d):
                gu[j] = wp * itf[p, j]
                gi_out[p, j] += wp * uf[u, j]
            for c in range(k):
                q = neg[i, c]
                w = np.float32(scale * z[c])
                for j in range(d):
                    gu[j] += w * itf[q, j]
                    gi_out[q, j] += w * uf[u, j]
            for j in range(d):
                gu_out[u, j] += gu[j]
        return total

    return softmax


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


def loss_denominator(loss: str, n_positives: int, num_negatives: int) -> int:
    """What the loss is a mean over: BPR's (positive, negative) pairs, softmax's positives."""
    return n_positives * num_negatives if loss == "bpr" else n_positives


def row_loss_gradient(final: torch.Tensor, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                      n_positives: int, loss: str = "bpr", temperature: float = 1.0,
                      chunk: int | None = None, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, grad)`` of ``loss`` over the positives, a mean over ``n_positives`` (the global
    batch, which may be larger than this call's share of it).

    ``users``, ``pos`` (B,) and ``neg`` (B, k) are row indices into ``final`` (n, d);
    ``grad`` is (n, d), the loss's gradient w.r.t. ``final``. With numba (``fused``) one pass
    holds one positive's rows at a time; in torch, ``chunk`` positives are scored at a time
    (None: all at once). The result depends on neither beyond float rounding.
    """
    final = final.detach().contiguous()
    grad = torch.zeros_like(final)
    value = row_loss_into(final, final, users, pos, neg, n_positives, grad, grad, loss, temperature, chunk, fused)
    return value, grad


def row_loss_into(user_rows: torch.Tensor, item_rows: torch.Tensor, users: torch.Tensor, pos: torch.Tensor,
                  neg: torch.Tensor, n_positives: int, user_grad: torch.Tensor, item_grad: torch.Tensor,
                  loss: str = "bpr", temperature: float = 1.0, chunk: int | None = None,
                  fused: bool = True) -> torch.Tensor:
    """The loss of :func:`row_loss_gradient` with users' rows and items' rows in two tables
    (``users`` index ``user_rows``, ``pos`` and ``neg`` index ``item_rows``); the gradients are
    added into ``user_grad`` and ``item_grad`` (shaped like the tables; they may be one tensor
    when the tables are one)."""
    if neg.dim() != 2 or neg.shape[0] != users.shape[0] or pos.shape != users.shape:
        raise GnaqInputError("users, pos must be (B,) and neg (B, k) with the same B")
    if chunk is not None and chunk < 1:
        raise GnaqInputError(f"chunk must be >= 1 or None, got {chunk}")
    if loss not in LOSSES:
        raise GnaqInputError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise GnaqInputError(f"temperature must be a finite number > 0, got {temperature}")
    denom = float(max(loss_denominator(loss, int(n_positives), int(neg.shape[1])), 1))
    user_rows, item_rows = user_rows.detach(), item_rows.detach()
    cpu32 = all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                for t in (user_rows, item_rows, user_grad, item_grad))
    kernel = _kernel(loss) if fused and cpu32 else None
    if kernel is not None:
        args = (user_rows.numpy(), item_rows.numpy(), users.numpy(), pos.numpy(), np.ascontiguousarray(neg.numpy()))
        scale = () if loss == "bpr" else (np.float32(1.0 / temperature),)
        total = kernel(*args, *scale, 1.0 / denom, user_grad.numpy(), item_grad.numpy())
        return torch.tensor(total / denom, dtype=user_rows.dtype)
    total = torch.zeros((), dtype=torch.float64)
    n = int(users.shape[0])
    step = n if chunk is None else int(chunk)
    d = user_rows.shape[1]
    for start in range(0, n, max(step, 1)):
        u_ids, p_ids, n_ids = users[start:start + step], pos[start:start + step], neg[start:start + step]
        u, p, q = user_rows[u_ids], item_rows[p_ids], item_rows[n_ids]  # (c, d), (c, d), (c, k, d)
        s_neg = torch.bmm(q, u.unsqueeze(2)).squeeze(2)  # (c, k)
        s_pos = (u * p).sum(1, keepdim=True)  # (c, 1)
        if loss == "bpr":
            diff = s_neg - s_pos
            total += F.softplus(diff).sum(dtype=torch.float64)
            g = torch.sigmoid(diff).div_(denom)  # d loss / d <u, n_k>
            g_pos = -g.sum(1, keepdim=True)
        else:
            logits = torch.cat([s_pos, s_neg], 1) / temperature
            total += (torch.logsumexp(logits, 1) - logits[:, 0]).sum(dtype=torch.float64)
            w = torch.softmax(logits, 1).div_(temperature * denom)
            g, g_pos = w[:, 1:], w[:, :1] - 1.0 / (temperature * denom)
        user_grad.index_add_(0, u_ids, torch.bmm(g.unsqueeze(1), q).squeeze(1) + g_pos * p)
        item_grad.index_add_(0, p_ids, g_pos * u)
        item_grad.index_add_(0, n_ids.reshape(-1), (g.unsqueeze(2) * u.unsqueeze(1)).reshape(-1, d))
    return (total / denom).to(user_rows.dtype)


__all__ = ["LOSSES", "BatchRows", "batch_rows", "loss_denominator", "row_loss_gradient", "row_loss_into"]
