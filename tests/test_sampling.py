"""BPR batches (coverage, true negatives, determinism) and neighbour blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnaq_dist._dgl import dgl
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, build_graph_from_arrays
from gnaq_dist.propagation import BLOCK_WEIGHT, SAMPLED_DEGREE
from gnaq_dist.sampling import BPRBatches, NegativeSampler, NeighborBlockSampler


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
