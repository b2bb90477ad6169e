"""The training graph: deduplication, symmetry, LightGCN normalisation, the CSR views."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import build_graph, build_graph_from_arrays, csr_keys, interactions_csr
from gnaq_dist.interactions import InteractionData
from gnaq_dist.propagation import propagate_full


def dense_a_hat(n_users: int, n_items: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    n = n_users + n_items
    a = np.zeros((n, n))
    a[users, items + n_users] = 1.0
    a[items + n_users, users] = 1.0
    deg = a.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(deg, 1.0))
    return inv[:, None] * a * inv[None, :]


def small_data() -> InteractionData:
    rng = np.random.default_rng(7)
    users = rng.integers(0, 12, 60)
    items = rng.integers(0, 9, 60)
    # user 12 and item 9 are isolated; the pair (0, 0) appears three times
    users = np.concatenate([users, [0, 0, 0]])
    items = np.concatenate([items, [0, 0, 0]])
    empty = np.zeros(0, dtype=np.int64)
    return InteractionData(13, 10, users, items, empty, empty)


def test_graph_matches_dense_reference() -> None:
    data = small_data()
    g = build_graph(data)
    ref = dense_a_hat(13, 10, data.train_user, data.train_item)
    n_pairs = len(set(zip(data.train_user.tolist(), data.train_item.tolist())))
    assert g.n_nodes == 23 and g.n_edges == n_pairs
    assert g.src.shape[0] == 2 * n_pairs and g.src.dtype == torch.int64
    np.testing.assert_allclose(g.degree.numpy(), (ref > 0).sum(1))
    np.testing.assert_allclose(g.adjacency().to_dense().numpy(), ref, atol=1e-7)
    np.testing.assert_allclose(g.adjacency(dtype=torch.float64).to_dense().numpy(), ref, atol=1e-12)
    assert g.degree[12] == 0 and g.degree[13 + 9] == 0
    assert not ref[12].any() and np.isfinite(g.norm.numpy()).all()
    assert g.adjacency() is g.adjacency()  # cached


def test_edges_sorted_by_dst_and_dgl_graph_agrees() -> None:
    g = build_graph(small_data())
    key = g.dst * g.n_nodes + g.src
    assert bool((key[1:] > key[:-1]).all())
    dg = g.dgl_graph()
    s, d = dg.edges()
    assert torch.equal(s, g.src) and torch.equal(d, g.dst)
    assert torch.equal(dg.edata["w"], g.norm)


def test_train_csr_and_keys() -> None:
    data = small_data()
    g = build_graph(data)
    indptr, indices = g.train_csr()
    pairs = sorted(set(zip(data.train_user.tolist(), data.train_item.tolist())))
    got = [(u, int(i)) for u in range(13) for i in indices[indptr[u] : indptr[u + 1]]]
    assert got == pairs
    keys = csr_keys(indptr, indices, 10)
    assert keys.tolist() == [u * 10 + i for u, i in pairs]


def test_bad_ids_raise() -> None:
    with pytest.raises(GnaqInputError):
        build_graph_from_arrays(3, 3, np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(GnaqInputError):
        interactions_csr(np.array([0]), np.array([-1]), 3, 3)


def _shared_gowalla() -> Path | None:
    for root in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        path = root / "data" / "gowalla" / "train.txt"
        if path.exists():
            return path
    return None


def _parse_lightgcn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    users, items = [], []
    with path.open() as f:
        for line in f:
            row = np.array(line.split(), dtype=np.int64)
            if row.size > 1:
                users.append(np.full(row.size - 1, row[0]))
                items.append(row[1:])
    return np.concatenate(users), np.concatenate(items)


@pytest.mark.shared_data
def test_gowalla_graph_and_full_propagation() -> None:
    path = _shared_gowalla()
    if path is None:
        pytest.skip("shared Gowalla split (shared/data/gowalla/train.txt) is absent")
    users, items = _parse_lightgcn_split(path)
    g = build_graph_from_arrays(int(users.max()) + 1, int(items.max()) + 1, users, items)
    assert (g.n_users, g.n_items, g.n_edges) == (29_858, 40_981, 810_128)
    assert g.src.shape[0] == 2 * 810_128
    x0 = torch.randn(g.n_nodes, 64, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    layers = propagate_full(g, x0, 3)
    elapsed = time.perf_counter() - start
    assert len(layers) == 4 and all(layer.shape == (g.n_nodes, 64) for layer in layers)
    assert torch.isfinite(layers[-1]).all()
    assert elapsed < 10.0
