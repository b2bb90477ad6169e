"""Full-ranking Recall/NDCG against a brute-force per-user reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.evaluation import EvalSums, evaluate_ranking, finalize, rank_topk
from gnaq_dist.graph import interactions_csr

N_USERS, N_ITEMS, DIM = 23, 31, 5


def random_split(seed: int = 0):
    rng = np.random.default_rng(seed)
    train_u, train_i = rng.integers(0, N_USERS, 150), rng.integers(0, N_ITEMS, 150)
    test_u, test_i = rng.integers(0, N_USERS, 60), rng.integers(0, N_ITEMS, 60)
    keep = test_u != 4  # user 4 has no test item
    train = interactions_csr(train_u, train_i, N_USERS, N_ITEMS)
    test = interactions_csr(test_u[keep], test_i[keep], N_USERS, N_ITEMS)
    user_emb = torch.tensor(rng.standard_normal((N_USERS, DIM)), dtype=torch.float32)
    item_emb = torch.tensor(rng.standard_normal((N_ITEMS, DIM)), dtype=torch.float32)
    return train, test, user_emb, item_emb


def row(csr, u: int) -> set[int]:
    indptr, indices = csr
    return set(indices[indptr[u] : indptr[u + 1]].tolist())


def brute_force(user_emb, item_emb, users, train, test, ks):
    """Loop over users: sort unmasked items by score, count hits, average."""
    scores_all = user_emb.double().numpy() @ item_emb.double().numpy().T
    totals = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    n = 0
    for u in users:
        relevant = row(test, u)
        if not relevant:
            continue
        n += 1
        seen = row(train, u)
        ranked = [i for i in np.argsort(-scores_all[u], kind="stable") if i not in seen]
        for k in ks:
            top = ranked[:k]
            hits = [1.0 if i in relevant else 0.0 for i in top]
            totals[f"recall@{k}"] += sum(hits) / len(relevant)
            dcg = sum(h / math.log2(p + 2) for p, h in enumerate(hits))
            idcg = sum(1 / math.log2(p + 2) for p in range(min(k, len(relevant))))
            totals[f"ndcg@{k}"] += dcg / idcg
    return {key: value / n for key, value in totals.items()}, n


@pytest.mark.parametrize("batch_size", [4, 1024])
def test_matches_brute_force(batch_size: int) -> None:
    train, test, user_emb, item_emb = random_split()
    ks = (1, 3, 10)
    users = np.arange(N_USERS)
    sums = evaluate_ranking(user_emb, item_emb, users, train, test, ks=ks, batch_size=batch_size)
    ref, n = brute_force(user_emb, item_emb, users, train, test, ks)
    assert not row(test, 4) and sums.n_users == n < N_USERS
    got = finalize(sums)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    assert 0 < got["recall@10"] < 1


def test_shards_sum_to_the_whole() -> None:
    train, test, user_emb, item_emb = random_split(1)
    ks = (1, 3, 10)
    whole = evaluate_ranking(user_emb, item_emb, None, train, test, ks=ks, batch_size=5)
    perm = np.random.default_rng(2).permutation(N_USERS)
    left, right = perm[:9], perm[9:]
    # one shard with global rows, one with rows aligned to its users
    a = evaluate_ranking(user_emb, item_emb, left, train, test, ks=ks, batch_size=3)
    b = evaluate_ranking(user_emb[torch.from_numpy(right)], item_emb, right, train, test, ks=ks, batch_size=3)
    total = EvalSums.from_tensor(ks, a.to_tensor() + b.to_tensor())
    assert total.n_users == whole.n_users
    np.testing.assert_allclose(total.recall, whole.recall, atol=1e-12)
    np.testing.assert_allclose(total.ndcg, whole.ndcg, atol=1e-12)
    assert (a + b).n_users == whole.n_users


def test_perfect_ranking_scores_one() -> None:
    rng = np.random.default_rng(3)
    n_users, n_items = 6, 12
    train = interactions_csr(np.array([0, 0, 1, 5]), np.array([1, 2, 3, 4]), n_users, n_items)
    test_u = np.repeat(np.arange(n_users), 3)
    unseen = [i for i in range(n_items) if i not in (1, 2, 3, 4)]
    test_i = np.concatenate([rng.choice(unseen, 3, replace=False) for _ in range(n_users)])
    test = interactions_csr(test_u, test_i, n_users, n_items)
    user_emb = torch.zeros(n_users, n_items)
    user_emb[torch.from_numpy(test_u), torch.from_numpy(test_i)] = 1.0
    user_emb[0, 1] = user_emb[0, 2] = 5.0  # train items score highest but are masked
    item_emb = torch.eye(n_items)
    got = finalize(evaluate_ranking(user_emb, item_emb, None, train, test, ks=(1, 3, 5), batch_size=4))
    assert got["recall@3"] == got["recall@5"] == 1.0
    assert got["recall@1"] == pytest.approx(1 / 3)
    assert got["ndcg@1"] == got["ndcg@3"] == got["ndcg@5"] == pytest.approx(1.0)


def test_rank_topk_masks_train_items() -> None:
    train, _, user_emb, item_emb = random_split(4)
    users = np.array([3, 0, 7, 22])
    items, scores = rank_topk(user_emb, item_emb, users, train, k_max=6, batch_size=3)
    assert items.shape == scores.shape == (4, 6)
    full = user_emb @ item_emb.T
    for r, u in enumerate(users):
        seen = row(train, u)
        ranked = [i for i in torch.argsort(full[u], descending=True).tolist() if i not in seen][:6]
        assert items[r].tolist() == ranked
        torch.testing.assert_close(scores[r], full[u, items[r]])


def test_bad_inputs() -> None:
    train, test, user_emb, item_emb = random_split()
    with pytest.raises(GnaqInputError):
        evaluate_ranking(user_emb[:5], item_emb, np.arange(6), train, test)
    with pytest.raises(GnaqInputError):
        evaluate_ranking(user_emb, item_emb, None, train, test, ks=(0,))
    with pytest.raises(GnaqInputError):
        evaluate_ranking(user_emb, item_emb, None, train, test, batch_size=0)
    with pytest.raises(GnaqInputError):
        rank_topk(user_emb, item_emb, np.array([N_USERS]), train, k_max=3)


def test_users_to_evaluate_samples_a_fixed_subset():
    from gnaq_dist.evaluation import users_to_evaluate

    indptr = np.array([0, 1, 1, 3, 4, 4, 6, 7, 9, 10, 12])  # users 1 and 4 hold nothing out
    everyone = users_to_evaluate(indptr)
    assert everyone.tolist() == [0, 2, 3, 5, 6, 7, 8, 9]
    sample = users_to_evaluate(indptr, max_users=3, seed=5)
    assert sample.shape == (3,) and set(sample) <= set(everyone) and np.all(np.diff(sample) > 0)
    assert np.array_equal(sample, users_to_evaluate(indptr, max_users=3, seed=5))  # same every time
    assert np.array_equal(users_to_evaluate(indptr, max_users=100), everyone)


def test_eval_max_users_is_validated():
    from gnaq_dist.config import load_config
    from gnaq_dist.errors import ConfigError
    from gnaq_dist.train.config import TrainConfig

    with pytest.raises(ConfigError, match="eval.max_users must be >= 1"):
        load_config(TrainConfig, [], ["eval.max_users=0"]).validate()
