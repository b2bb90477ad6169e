"""Partitioning of users and items over ranks: balance, bijection onto local rows, determinism."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from distributed_utils import edge_cut_fraction
from gnaq_dist.distributed.partition import (
    Partition,
    balance_loads,
    hash_owner,
    partition_nodes,
    rank_loads,
)
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import build_graph
from gnaq_dist.synthetic import clustered_interactions


@pytest.fixture(scope="module")
def data():
    return clustered_interactions(n_users=300, n_items=200, seed=0)


@pytest.fixture(scope="module")
def graph(data):
    return build_graph(data)


def _check_bijection(part: Partition) -> None:
    """Every node has exactly one (owner, local row) and each rank's rows are 0..count-1."""
    seen = np.zeros(part.num_nodes, dtype=np.int64)
    for r in range(part.world_size):
        ids = part.owned_ids(r)
        assert np.all(np.diff(ids) > 0)  # sorted, unique
        assert np.all(part.owner[ids] == r)
        np.testing.assert_array_equal(part.local_index[ids], np.arange(ids.size))
        seen[ids] += 1
    np.testing.assert_array_equal(seen, 1)
    assert part.counts().sum() == part.num_nodes


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_hash_partition_is_exactly_balanced_and_a_bijection(graph, world_size):
    part = partition_nodes(graph, world_size, method="hash", seed=7)
    assert part.method == "hash"
    _check_bijection(part)
    for counts, n in ((part.user_counts(), graph.n_users), (part.item_counts(), graph.n_items)):
        assert counts.max() - counts.min() <= 1
        assert counts.sum() == n


def test_hash_partition_is_deterministic_for_a_seed_and_changes_with_it(graph):
    a = partition_nodes(graph, 3, method="hash", seed=1)
    b = partition_nodes(graph, 3, method="hash", seed=1)
    c = partition_nodes(graph, 3, method="hash", seed=2)
    np.testing.assert_array_equal(a.owner, b.owner)
    assert a.checksum() == b.checksum()
    assert not np.array_equal(a.owner, c.owner)
    assert a.checksum() != c.checksum()
    # Not a plain modulo: consecutive ids are spread, not striped.
    assert not np.array_equal(a.owner[:300], np.arange(300) % 3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_metis_partition_balances_users_and_items_and_cuts_fewer_edges(graph, world_size):
    part = partition_nodes(graph, world_size, method="metis")
    assert part.method == "metis"
    _check_bijection(part)
    for counts, n in ((part.user_counts(), graph.n_users), (part.item_counts(), graph.n_items)):
        assert counts.sum() == n
        assert np.all(np.abs(counts - n / world_size) <= 0.15 * n / world_size + 1), counts
    # The clustered graph has structure METIS should find; hash ignores it.
    hashed = partition_nodes(graph, world_size, method="hash")
    assert edge_cut_fraction(part, graph) < 0.8 * edge_cut_fraction(hashed, graph)


def _train_pairs(graph):
    indptr, items = graph.train_csr()
    return np.repeat(np.arange(graph.n_users, dtype=np.int64), np.diff(indptr)), items


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_loads_count_each_ranks_nonzeros_rows_and_halo(graph, world_size):
    owner = hash_owner(graph.n_users, graph.n_items, world_size, seed=5)
    users, items = _train_pairs(graph)
    load = rank_loads(owner, users, items, graph.n_users, world_size)
    src, dst = graph.src.numpy(), graph.dst.numpy()  # both directions of every train edge
    for r in range(world_size):
        into = owner[dst] == r
        assert load.nonzeros[r] == into.sum()  # the rank's rows of A_hat
        assert load.own[r] == (owner == r).sum()
        assert load.halo[r] == len(set(src[into & (owner[src] != r)].tolist()))
    assert load.cut_edges == (owner[users] != owner[graph.n_users + items]).sum()


def test_balance_loads_evens_out_a_skewed_partition(graph):
    users, items = _train_pairs(graph)
    owner = hash_owner(graph.n_users, graph.n_items, 2, seed=1)
    rng = np.random.default_rng(0)
    ones = np.flatnonzero(owner == 1)
    owner[rng.choice(ones, size=ones.size // 2, replace=False)] = 0  # rank 0 gets ~3/4 of the rows
    moved, before, after = balance_loads(owner, users, items, graph.n_users, 2)
    assert before.imbalance > 0.3
    assert after.imbalance < 0.05
    again = rank_loads(moved, users, items, graph.n_users, 2)
    np.testing.assert_array_equal(again.cost, after.cost)
    assert np.all(np.bincount(moved, minlength=2) > 0)
    # Only nodes of the busy rank moved, and only to the idle one.
    assert np.all(moved[owner == 1] == 1)
    # A balanced start is left alone.
    even, b, a = balance_loads(moved, users, items, graph.n_users, 2, tolerance=0.1)
    np.testing.assert_array_equal(even, moved)


def test_metis_partition_balances_the_modelled_step_cost(graph, caplog):
    with caplog.at_level(logging.INFO, logger="gnaq_dist.distributed.partition"):
        part = partition_nodes(graph, 2, method="metis")
    assert "balanced the modelled step cost" in caplog.text
    users, items = _train_pairs(graph)
    assert rank_loads(part.owner, users, items, graph.n_users, 2).imbalance < 0.05


def test_unusable_metis_result_falls_back_to_hash_and_says_so(graph, caplog):
    # METIS aims at 3% imbalance: 200 items over 3 ranks give one rank 68 (seen in every
    # run), above the ceil(200/3) = 67 that max_imbalance=0 allows.
    with caplog.at_level(logging.WARNING, logger="gnaq_dist.distributed.partition"):
        part = partition_nodes(graph, 3, method="metis", seed=3, max_imbalance=0.0)
    assert part.method == "hash"
    assert "falling back to hash" in caplog.text and "max_imbalance" in caplog.text
    np.testing.assert_array_equal(part.owner, hash_owner(graph.n_users, graph.n_items, 3, seed=3))


def test_describe_records_method_sizes_and_checksum(graph):
    part = partition_nodes(graph, 2, method="hash")
    desc = part.describe()
    assert desc["method"] == "hash" and desc["world_size"] == 2
    assert desc["rows_per_rank"] == [250, 250]
    assert desc["users_per_rank"] == [150, 150] and desc["items_per_rank"] == [100, 100]
    assert desc["owner_checksum"] == part.checksum() and len(desc["owner_checksum"]) == 16
    moved = Partition.from_owner(np.roll(part.owner, 1), 2, part.n_users, part.n_items)
    assert moved.checksum() != part.checksum()


def test_bad_input_raises_one_line_errors(data, graph):
    with pytest.raises(GnaqInputError, match="partition method"):
        partition_nodes(graph, 2, method="random")
    with pytest.raises(GnaqInputError, match="world_size"):
        partition_nodes(graph, 0)
    with pytest.raises(GnaqInputError, match="max_imbalance"):
        partition_nodes(graph, 2, max_imbalance=-0.5)
    part = partition_nodes(graph, 2, method="hash")
    with pytest.raises(GnaqInputError, match="rank must lie"):
        part.owned_ids(2)
    with pytest.raises(GnaqInputError, match="owner ranks"):
        Partition.from_owner(np.full(part.num_nodes, 5), 2, part.n_users, part.n_items)
