"""BPR batches (coverage, true negatives, determinism) and neighbour blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnaq_dist._dgl import dgl
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, build_graph_from_arrays
from gnaq_dist.propagation import BLOCK_WEIGHT, SAMPLED_DEGREE
from gnaq_dist.graph import TrainCSR, csr_rows_of
from gnaq_dist.sampling import BPRBatches, NegativeSampler, NeighborBlockSampler, OwnedBPRBatches


def random_graph(n_users: int = 40, n_items: int = 30, p: float = 0.25, seed: int = 0) -> BipartiteGraph:
    rng = np.random.default_rng(seed)
    mask = rng.random((n_users, n_items)) < p
    mask[1, :] = True  # user 1 has no room for a negative
    mask[2, :] = False  # user 2 has no train item
    mask[3, :] = True
    mask[3, -1] = False  # user 3 has exactly one non-train item
    users, items = np.nonzero(mask)
    return build_graph_from_arrays(n_users, n_items, users, items)


def train_sets(g: BipartiteGraph) -> list[set[int]]:
    indptr, indices = g.train_csr()
    return [set(indices[indptr[u] : indptr[u + 1]].tolist()) for u in range(g.n_users)]


def test_bpr_epoch_covers_each_edge_once_with_true_negatives() -> None:
    g = random_graph()
    batches = BPRBatches(g, batch_size=37, num_negatives=4, seed=3)
    seen = train_sets(g)
    users, pos, neg = [], [], []
    for b in batches:
        assert b.users.dtype == torch.int64 and b.neg.shape == (len(b.users), 4)
        assert len(b.users) <= 37
        users.append(b.users)
        pos.append(b.pos)
        neg.append(b.neg)
    assert len(users) == len(batches)
    users, pos, neg = torch.cat(users).numpy(), torch.cat(pos).numpy(), torch.cat(neg).numpy()
    pairs = sorted(zip(users.tolist(), pos.tolist()))
    assert pairs == sorted((u, i) for u in range(g.n_users) for i in seen[u])
    assert len(set(pairs)) == len(pairs) == g.n_edges
    assert neg.min() >= 0 and neg.max() < g.n_items
    for u, row in zip(users, neg):
        if len(seen[u]) < g.n_items:
            assert not seen[u].intersection(row.tolist())
    assert set(neg[users == 3].ravel().tolist()) == {g.n_items - 1}  # the only item with room


def test_bpr_is_deterministic_per_seed_and_epoch() -> None:
    g = random_graph()

    def epoch(seed: int, e: int) -> list[torch.Tensor]:
        batches = BPRBatches(g, batch_size=50, num_negatives=2, seed=seed)
        batches.set_epoch(e)
        return [t for b in batches for t in b]

    a, b = epoch(1, 0), epoch(1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], epoch(2, 0)[0])
    assert not torch.equal(a[0], epoch(1, 1)[0])


def test_drop_last_and_bad_arguments() -> None:
    g = random_graph()
    batches = BPRBatches(g, batch_size=64, drop_last=True)
    assert len(batches) == g.n_edges // 64
    assert all(len(b.users) == 64 for b in batches)
    with pytest.raises(GnaqInputError):
        BPRBatches(g, batch_size=0)
    with pytest.raises(GnaqInputError):
        BPRBatches(g, batch_size=8, num_negatives=0)


def test_negatives_are_uniform_over_non_train_items() -> None:
    """7 non-train items, 70,000 draws: each count is 10,000 +- 6 sd (sd ~ 93)."""
    indptr = np.array([0, 3])
    indices = np.array([2, 5, 6])
    sampler = NegativeSampler(indptr, indices, 10)
    neg = sampler.sample(np.zeros(7000, dtype=np.int64), 10, np.random.default_rng(0))
    counts = np.bincount(neg.ravel(), minlength=10)
    assert counts[[2, 5, 6]].sum() == 0
    expected = 10_000
    sd = np.sqrt(70_000 * (1 / 7) * (6 / 7))
    assert np.abs(counts[[0, 1, 3, 4, 7, 8, 9]] - expected).max() < 6 * sd


def test_fanout_length_must_match_layers() -> None:
    g = random_graph()
    with pytest.raises(GnaqInputError):
        NeighborBlockSampler(g, [5, 5], num_layers=3)
    with pytest.raises(GnaqInputError):
        NeighborBlockSampler(g, [5, 0])
    with pytest.raises(GnaqInputError):
        NeighborBlockSampler(g, [5]).sample(torch.tensor([1, 1]))


@pytest.mark.parametrize("fanouts", [[3, 2], [-1, 4]])
def test_blocks_respect_fanout_and_map_to_graph_edges(fanouts: list[int]) -> None:
    g = random_graph()
    seeds = torch.tensor([5, 0, 50, 2, 41])  # user 2 has no neighbours
    dgl.seed(0)
    input_nodes, blocks = NeighborBlockSampler(g, fanouts, num_layers=2).sample(seeds)
    assert len(blocks) == 2
    assert torch.equal(blocks[-1].dstdata[dgl.NID], seeds)
    assert torch.equal(blocks[0].srcdata[dgl.NID], input_nodes)
    assert torch.equal(blocks[1].srcdata[dgl.NID], blocks[0].dstdata[dgl.NID])
    for block, fanout in zip(blocks, fanouts):
        dst_ids = block.dstdata[dgl.NID]
        assert torch.equal(block.srcdata[dgl.NID][: len(dst_ids)], dst_ids)  # dst nodes first
        full = g.degree[dst_ids]
        expected = full if fanout == -1 else full.clamp(max=fanout)
        assert torch.equal(block.in_degrees().float(), expected)
        assert torch.equal(block.dstdata[SAMPLED_DEGREE], expected)
        s, d = block.edges()
        eid = block.edata[dgl.EID]
        assert torch.equal(g.src[eid], block.srcdata[dgl.NID][s])
        assert torch.equal(g.dst[eid], dst_ids[d])
        factor = full[d] / expected[d]
        torch.testing.assert_close(block.edata[BLOCK_WEIGHT], g.norm[eid] * factor)


def test_block_sampling_is_deterministic_given_dgl_seed() -> None:
    g = random_graph()
    sampler = NeighborBlockSampler(g, [2, 2])
    seeds = torch.arange(0, g.n_nodes, 3)

    def draw(seed: int) -> list[torch.Tensor]:
        dgl.seed(seed)
        input_nodes, blocks = sampler.sample(seeds)
        return [input_nodes] + [b.edata[dgl.EID] for b in blocks]

    a, b = draw(4), draw(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, draw(5)))


def test_bpr_batches_from_the_train_csr_alone_equal_those_from_the_graph() -> None:
    """Split propagation gives BPRBatches a TrainCSR (no symmetric edge arrays): same batches."""
    from gnaq_dist.graph import TrainCSR

    g = random_graph(seed=5)
    indptr, indices = g.train_csr()
    users = np.repeat(np.arange(g.n_users), np.diff(indptr))
    csr = TrainCSR.from_pairs(g.n_users, g.n_items, users[::-1].copy(), indices[::-1].copy())  # any order
    assert np.array_equal(csr.indptr, indptr) and np.array_equal(csr.indices, indices)
    for a, b in zip(BPRBatches(g, 16, 3, seed=1), BPRBatches(csr, 16, 3, seed=1), strict=True):
        assert all(torch.equal(x, y) and x.dtype == torch.int64 for x, y in zip(a, b))


# -- a rank's share of the global batches ----------------------------------------------------
def _owned_epoch(g: BipartiteGraph, owner: np.ndarray, rank: int, restrict: bool, epoch: int = 1,
                 batch_size: int = 37) -> list:
    indptr, indices = g.train_csr()
    whole = TrainCSR(g.n_users, g.n_items, indptr, indices)
    mine = owner == rank
    own = whole.rows_of(mine) if restrict else whole
    batches = OwnedBPRBatches(indptr, own, mine, batch_size, num_negatives=3, seed=4)
    batches.set_epoch(epoch)
    return list(batches)


def _triples(batch) -> list[tuple]:
    return sorted(zip(batch.users.tolist(), batch.pos.tolist(), map(tuple, batch.neg.tolist())))


@pytest.mark.parametrize("world", [2, 3])
def test_owned_batches_of_all_ranks_are_the_one_rank_batches(world) -> None:
    """What makes W ranks train like one: at every step the ranks' shares (own users only,
    from a CSR of their own rows) add up to exactly the single rank's batch, negatives included."""
    g = random_graph()
    one = _owned_epoch(g, np.zeros(g.n_users, dtype=np.int64), 0, restrict=False)
    owner = np.random.default_rng(world).integers(0, world, g.n_users)
    ranks = [_owned_epoch(g, owner, r, restrict=True) for r in range(world)]
    assert len(one) == -(-g.n_edges // 37) and all(len(r) == len(one) for r in ranks)
    for step, whole in enumerate(one):
        parts = [r[step] for r in ranks]
        assert all(p.global_size == whole.global_size == len(whole.users) for p in parts)
        for r, p in enumerate(parts):
            assert (owner[p.users.numpy()] == r).all()
        assert sorted(t for p in parts for t in _triples(p)) == _triples(whole)
    # The same with the whole CSR and a mask (sampled propagation keeps every edge).
    masked = _owned_epoch(g, owner, 1, restrict=False)
    assert [_triples(b) for b in masked] == [_triples(b) for b in ranks[1]]


def test_owned_batches_cover_each_edge_once_with_true_negatives_and_reshuffle() -> None:
    g = random_graph()
    seen = train_sets(g)
    epoch = _owned_epoch(g, np.zeros(g.n_users, dtype=np.int64), 0, restrict=False)
    triples = [t for b in epoch for t in zip(b.users.tolist(), b.pos.tolist(), b.neg.tolist())]
    assert sorted((u, i) for u, i, _ in triples) == sorted((u, i) for u in range(g.n_users) for i in seen[u])
    for u, _, negs in triples:
        assert all(0 <= n < g.n_items for n in negs)
        if len(seen[u]) < g.n_items:
            assert not seen[u].intersection(negs)
    assert {n for u, _, negs in triples if u == 3 for n in negs} == {g.n_items - 1}
    again = _owned_epoch(g, np.zeros(g.n_users, dtype=np.int64), 0, restrict=False)
    assert [_triples(b) for b in again] == [_triples(b) for b in epoch]
    other = _owned_epoch(g, np.zeros(g.n_users, dtype=np.int64), 0, restrict=False, epoch=2)
    assert [b.users.tolist() for b in other] != [b.users.tolist() for b in epoch]


def test_csr_rows_of_keeps_the_pointers_and_only_the_kept_rows_items() -> None:
    indptr, indices = np.array([0, 2, 3, 3, 6]), np.array([1, 4, 0, 2, 3, 5])
    kept_ptr, kept = csr_rows_of(indptr, indices, np.array([True, False, True, True]))
    np.testing.assert_array_equal(kept_ptr, [0, 2, 2, 2, 5])
    np.testing.assert_array_equal(kept, [1, 4, 2, 3, 5])
    with pytest.raises(GnaqInputError, match="keep has 3 rows, the CSR 4"):
        csr_rows_of(indptr, indices, np.ones(3, dtype=bool))
    whole = TrainCSR(4, 6, indptr, indices)
    with pytest.raises(GnaqInputError, match="an owned user's items differ"):
        OwnedBPRBatches(indptr, whole.rows_of(np.array([True, False, False, False])),
                        np.array([True, True, False, False]), 4)


def test_numba_row_search_draws_the_same_negatives_as_one_searchsorted(monkeypatch) -> None:
    """The kernel searches each user's row; the fallback one sorted array of all rows."""
    import gnaq_dist.sampling as sampling

    rng = np.random.default_rng(4)
    n_users, n_items = 60, 40
    pairs = np.unique(rng.integers(0, n_users, 700) * n_items + rng.integers(0, n_items, 700))
    users, items = pairs // n_items, pairs % n_items
    csr = TrainCSR.from_pairs(n_users, n_items, users, items)
    sampler = NegativeSampler(*csr.train_csr(), n_items)
    queries = rng.integers(0, n_users, 500)
    fused = sampler.sample(queries, 6, np.random.default_rng(9))
    monkeypatch.setattr(sampling, "_rank_kernel", lambda: None)
    plain = NegativeSampler(*csr.train_csr(), n_items).sample(queries, 6, np.random.default_rng(9))
    np.testing.assert_array_equal(fused, plain)
    indptr, indices = csr.train_csr()
    for u, row in zip(queries, fused):
        assert not set(row) & set(indices[indptr[u]:indptr[u + 1]])


def test_owned_batches_made_in_slices_are_the_same_batches(monkeypatch) -> None:
    """A batch is drawn a slice of positions at a time, each slice in train-edge order: the
    slice size changes that order, not the batch's positives or their negatives."""
    g = random_graph()
    owner = np.random.default_rng(3).integers(0, 2, g.n_users)
    whole = _owned_epoch(g, owner, 1, restrict=True)
    monkeypatch.setattr(OwnedBPRBatches, "SLICE", 5)
    sliced = _owned_epoch(g, owner, 1, restrict=True)
    assert len(sliced) == len(whole)
    for a, b in zip(whole, sliced):
        assert a.global_size == b.global_size
        assert _triples(a) == _triples(b)
        # whole: one slice, so the batch ascends by (user, item); sliced: runs of 5 positions
        assert a.users.tolist() == sorted(a.users.tolist()) and len(_triples(a)) > 5


def test_owned_batches_numba_draw_is_the_numpy_draw(monkeypatch) -> None:
    """The fused kernel against the numpy passes: the same users, items and negatives, with a
    user who has every item (room 0: uniform negatives) and several slices a batch."""
    import gnaq_dist.sampling as sampling

    rng = np.random.default_rng(5)
    n_users, n_items = 50, 30
    pairs = np.unique(rng.integers(0, n_users, 400) * n_items + rng.integers(0, n_items, 400))
    pairs = np.union1d(pairs, 7 * n_items + np.arange(n_items))  # user 7 has every item
    csr = TrainCSR.from_pairs(n_users, n_items, pairs // n_items, pairs % n_items)
    own = rng.integers(0, 2, n_users) == 0
    own[7] = True
    monkeypatch.setattr(OwnedBPRBatches, "SLICE", 37)

    def epoch():
        b = OwnedBPRBatches(csr.indptr, csr.rows_of(own), own, 64, num_negatives=3, seed=11)
        b.set_epoch(2)
        return list(b)

    assert sampling._owned_slice_kernels() is not None
    fused = epoch()
    monkeypatch.setattr(sampling, "_owned_slice_kernels", lambda: None)
    plain = epoch()
    assert len(fused) == len(plain) and any(7 in b.users.tolist() for b in fused)
    for a, b in zip(fused, plain):
        assert a.global_size == b.global_size
        for x, y in zip(a[:3], b[:3]):
            assert torch.equal(x, y)
