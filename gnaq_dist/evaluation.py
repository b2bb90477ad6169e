"""Full-ranking evaluation: Recall@K and NDCG@K over all items, train items masked.

Users are scored in batches so memory stays ``O(batch_size * n_items)``. Metrics are
returned as SUMS with the user count (:class:`EvalSums`), so that workers evaluating
disjoint user shards can all-reduce them before :func:`finalize` divides.
Users without test items are skipped (they count in neither sum nor count).

Embedding rows: if ``user_emb`` has ``n_users`` rows it is indexed by the global ids in
``users``; otherwise it must have ``len(users)`` rows aligned with ``users`` (a shard).
Scores that are no dot product (a generator's ground truth) go through
:func:`evaluate_scores`, which takes a per-batch scoring function instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import csr_keys


@dataclass
class EvalSums:
    """Per-K sums of recall and NDCG over ``n_users`` evaluated users."""

    ks: tuple[int, ...]
    recall: np.ndarray  # float64 (len(ks),)
    ndcg: np.ndarray  # float64 (len(ks),)
    n_users: int

    def __add__(self, other: EvalSums) -> EvalSums:
        if tuple(self.ks) != tuple(other.ks):
            raise GnaqInputError(f"cannot add sums over ks {self.ks} and {other.ks}")
        return EvalSums(self.ks, self.recall + other.recall, self.ndcg + other.ndcg, self.n_users + other.n_users)

    def to_tensor(self) -> torch.Tensor:
        """Flat float64 ``[recall..., ndcg..., n_users]`` for one ``all_reduce(SUM)``."""
        return torch.from_numpy(np.concatenate([self.recall, self.ndcg, [float(self.n_users)]]))

    @classmethod
    def from_tensor(cls, ks: Sequence[int], t: torch.Tensor) -> EvalSums:
        v = t.detach().cpu().to(torch.float64).numpy()
        n = len(ks)
        return cls(tuple(ks), v[:n].copy(), v[n : 2 * n].copy(), int(round(v[2 * n])))


def finalize(sums: EvalSums) -> dict[str, float]:
    """Means over users: ``{"recall@10": ..., "ndcg@10": ..., ...}`` (0.0 if no user)."""
    denom = max(sums.n_users, 1)
    out: dict[str, float] = {}
    for j, k in enumerate(sums.ks):
        out[f"recall@{k}"] = float(sums.recall[j] / denom)
        out[f"ndcg@{k}"] = float(sums.ndcg[j] / denom)
    return out


def _user_rows(user_emb: torch.Tensor, users: np.ndarray, n_users: int) -> np.ndarray:
    """Row of ``user_emb`` for each entry of ``users`` (see the module docstring)."""
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise GnaqInputError(f"user ids must lie in [0, {n_users}), got [{users.min()}, {users.max()}]")
    if user_emb.shape[0] == n_users:
        return users
    if user_emb.shape[0] == users.shape[0]:
        return np.arange(users.shape[0], dtype=np.int64)
    raise GnaqInputError(
        f"user_emb has {user_emb.shape[0]} rows: expected n_users={n_users} or len(users)={users.shape[0]}"
    )


def _ragged_positions(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For CSR rows ``rows``: (batch row index, position in ``indices``) of every entry."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    batch_row = np.repeat(np.arange(rows.shape[0], dtype=np.int64), lens)
    offsets = np.arange(batch_row.shape[0], dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    return batch_row, starts[batch_row] + offsets


def _check_csr(
    name: str, csr: tuple[np.ndarray, np.ndarray], n_users: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """As int64 arrays; the user count checked where it must agree with another CSR."""
    indptr = np.asarray(csr[0], dtype=np.int64)
    indices = np.asarray(csr[1], dtype=np.int64)
    if n_users is not None and indptr.shape[0] != n_users + 1:
        raise GnaqInputError(f"{name} has {indptr.shape[0] - 1} users, expected {n_users}")
    return indptr, indices


#: ``score(batch users, their rows) -> (B, n_items)`` scores, a fresh tensor (train items are
#: overwritten with ``-inf`` in place).
BatchScores = Callable[[np.ndarray, np.ndarray], torch.Tensor]


def _dot_scores(user_emb: torch.Tensor, item_emb: torch.Tensor) -> BatchScores:
    """Scores as dot products of ``user_emb`` rows with every item's embedding."""
    user_t, item_t = user_emb.detach(), item_emb.detach()

    def score(users: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        return user_t[torch.from_numpy(rows)] @ item_t.T

    return score


def _topk_batches(
    score: BatchScores,
    users: np.ndarray,
    rows: np.ndarray,
    train_csr: tuple[np.ndarray, np.ndarray],
    k: int,
    batch_size: int,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch users, top-k items, top-k scores)`` with train items at ``-inf``;
    ``rows[j]`` is the scoring row for ``users[j]``."""
    if batch_size <= 0:
        raise GnaqInputError(f"batch_size must be positive, got {batch_size}")
    indptr, indices = train_csr
    for start in range(0, users.shape[0], batch_size):
        bu = users[start : start + batch_size]
        scores = score(bu, rows[start : start + batch_size])
        r, pos = _ragged_positions(indptr, bu)
        scores[torch.from_numpy(r), torch.from_numpy(indices[pos])] = float("-inf")
        top_scores, top_items = torch.topk(scores, k, dim=1)
        yield bu, top_items, top_scores


def rank_topk(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    users: np.ndarray | torch.Tensor,
    train_csr: tuple[np.ndarray, np.ndarray],
    k_max: int,
    batch_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k_max`` items (and scores) per user over all items, train items excluded
    (they score ``-inf`` and appear only when a user has fewer than ``k_max`` others)."""
    users_np = np.asarray(users, dtype=np.int64)
    indptr, indices = _check_csr("train_csr", train_csr)
    k = min(int(k_max), item_emb.shape[0])
    items_out, scores_out = [], []
    rows = _user_rows(user_emb, users_np, indptr.shape[0] - 1)
    batches = _topk_batches(_dot_scores(user_emb, item_emb), users_np, rows, (indptr, indices), k, batch_size)
    for _, top_items, top_scores in batches:
        items_out.append(top_items)
        scores_out.append(top_scores)
    if not items_out:
        return torch.empty(0, k, dtype=torch.int64), torch.empty(0, k, dtype=item_emb.dtype)
    return torch.cat(items_out), torch.cat(scores_out)


def users_to_evaluate(test_indptr: np.ndarray, max_users: int | None = None, seed: int = 0) -> np.ndarray:
    """Users with at least one held-out item; a fixed random sample of ``max_users`` of them if set.

    Full ranking costs users x items dot products: on a large graph a sample (the same
    one at every evaluation, every worker count and every resume) keeps evaluations cheap.
    """
    users = np.flatnonzero(np.diff(np.asarray(test_indptr)) > 0)
    if max_users is not None and users.shape[0] > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, int(max_users), replace=False))
    return users


def evaluate_ranking(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    users: np.ndarray | torch.Tensor | None,
    train_csr: tuple[np.ndarray, np.ndarray],
    test_csr: tuple[np.ndarray, np.ndarray],
    ks: Sequence[int] = (10, 20, 50),
    batch_size: int = 1024,
    progress: bool = False,
) -> EvalSums:
    """Recall/NDCG sums at each K for ``users`` (all users if None) with >= 1 test item.

    ``progress`` shows a bar (users/s, ETA) on stderr: ranking every user against every
    item is the long part of an evaluation on a large graph.

    ``test_csr`` rows must be sorted and duplicate-free, as
    :func:`gnaq_dist.graph.interactions_csr` makes them.
    """
    return _ranking_sums(_dot_scores(user_emb, item_emb), item_emb.shape[0],
                         lambda u, n: _user_rows(user_emb, u, n), users, train_csr, test_csr, ks, batch_size,
                         progress)


def evaluate_scores(
    score: Callable[[np.ndarray], torch.Tensor],
    n_items: int,
    users: np.ndarray | torch.Tensor | None,
    train_csr: tuple[np.ndarray, np.ndarray],
    test_csr: tuple[np.ndarray, np.ndarray],
    ks: Sequence[int] = (10, 20, 50),
    batch_size: int = 1024,
    progress: bool = False,
) -> EvalSums:
    """As :func:`evaluate_ranking`, with ``score(batch of global user ids) -> (B, n_items)``
    (a fresh tensor) in place of embedding dot products: for scores that are no low-rank
    product, still computed a batch at a time."""

    def check(users_np: np.ndarray, n_users: int) -> np.ndarray:
        if users_np.size and (users_np.min() < 0 or users_np.max() >= n_users):
            raise GnaqInputError(f"user ids must lie in [0, {n_users}), got [{users_np.min()}, {users_np.max()}]")
        return users_np

    return _ranking_sums(lambda bu, rows: score(bu), int(n_items), check, users, train_csr, test_csr, ks,
                         batch_size, progress)


def _ranking_sums(
    score: BatchScores,
    n_items: int,
    rows_of: Callable[[np.ndarray, int], np.ndarray],
    users: np.ndarray | torch.Tensor | None,
    train_csr: tuple[np.ndarray, np.ndarray],
    test_csr: tuple[np.ndarray, np.ndarray],
    ks: Sequence[int],
    batch_size: int,
    progress: bool,
) -> EvalSums:
    """The metric sums of both entry points; ``rows_of(users, n_users)`` gives each user's scoring row."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) <= 0:
        raise GnaqInputError(f"ks must be positive, got {ks}")
    t_indptr, t_indices = _check_csr("test_csr", test_csr)
    n_users = t_indptr.shape[0] - 1
    tr_indptr, tr_indices = _check_csr("train_csr", train_csr, n_users)
    users_np = np.arange(n_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    n_test = np.diff(t_indptr)[users_np]
    keep = n_test > 0
    rows = rows_of(users_np, n_users)[keep]
    users_np, n_test = users_np[keep], n_test[keep]

    k_top = min(max(ks), n_items)
    test_keys = csr_keys(t_indptr, t_indices, n_items)
    discount = 1.0 / np.log2(np.arange(k_top, dtype=np.float64) + 2.0)
    idcg_table = np.concatenate([[0.0], np.cumsum(discount)])  # idcg_table[m] = sum of first m
    recall = np.zeros(len(ks))
    ndcg = np.zeros(len(ks))
    done = 0
    bar = tqdm(total=int(users_np.shape[0]), unit="user", unit_scale=True, desc="evaluate", leave=False,
               disable=not progress, mininterval=1.0)
    for bu, top_items, top_scores in _topk_batches(score, users_np, rows, (tr_indptr, tr_indices), k_top, batch_size):
        nt = n_test[done : done + bu.shape[0]]
        done += bu.shape[0]
        bar.update(bu.shape[0])
        query = bu[:, None] * np.int64(n_items) + top_items.numpy()
        loc = np.minimum(np.searchsorted(test_keys, query), max(test_keys.shape[0] - 1, 0))
        hits = (test_keys[loc] == query) & np.isfinite(top_scores.numpy())  # masked items never hit
        for j, k in enumerate(ks):
            h = hits[:, :k]
            recall[j] += float((h.sum(1) / nt).sum())
            idcg = idcg_table[np.minimum(nt, k).clip(max=k_top)]
            ndcg[j] += float(((h * discount[: h.shape[1]]).sum(1) / idcg).sum())
    bar.close()
    return EvalSums(ks, recall, ndcg, int(users_np.shape[0]))


__all__ = ["EvalSums", "evaluate_ranking", "evaluate_scores", "finalize", "rank_topk", "users_to_evaluate"]
