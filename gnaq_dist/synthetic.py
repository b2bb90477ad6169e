"""Small synthetic interaction data with structure a recommender can learn.

Users and items belong to latent clusters; a user interacts mostly with items of its
own cluster. Used by tests and smoke runs where a real dataset would be too slow: a
model that learns anything beats random ranking on it by a wide margin.
"""

from __future__ import annotations

import numpy as np

from gnaq_dist.interactions import InteractionData


def clustered_interactions(
    n_users: int = 300,
    n_items: int = 200,
    n_clusters: int = 5,
    per_user: int = 12,
    test_per_user: int = 3,
    noise: float = 0.1,
    seed: int = 0,
    valid_per_user: int = 0,
) -> InteractionData:
    """``per_user`` distinct items per user, ``test_per_user`` of them held out for test
    and the next ``valid_per_user`` for validation (each user keeps >= 1 train item)."""
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(0, n_clusters, n_users)
    item_cluster = np.arange(n_items) % n_clusters
    by_cluster = [np.flatnonzero(item_cluster == c) for c in range(n_clusters)]
    users, items = [], []
    for u in range(n_users):
        own = by_cluster[user_cluster[u]]
        n_noise = rng.binomial(per_user, noise)
        chosen = np.concatenate([
            rng.choice(own, min(per_user - n_noise, own.size), replace=False),
            rng.choice(n_items, n_noise, replace=False),
        ])
        chosen = np.unique(chosen)
        users.append(np.full(chosen.size, u))
        items.append(rng.permutation(chosen))
    train_u, train_i, test_u, test_i, valid_u, valid_i = [], [], [], [], [], []
    for u, its in zip(users, items):
        k = min(test_per_user, its.size - 1)
        v = k + min(valid_per_user, its.size - 1 - k)
        test_u.append(u[:k]); test_i.append(its[:k])
        valid_u.append(u[k:v]); valid_i.append(its[k:v])
        train_u.append(u[v:]); train_i.append(its[v:])
    valid = {"valid_user": np.concatenate(valid_u), "valid_item": np.concatenate(valid_i)} if valid_per_user else {}
    return InteractionData(
        n_users=n_users, n_items=n_items,
        train_user=np.concatenate(train_u), train_item=np.concatenate(train_i),
        test_user=np.concatenate(test_u), test_item=np.concatenate(test_i),
        name="synthetic-clustered", **valid,
    )
