"""LightGCN propagation: full graph vs a dense reference, blocks vs full, unbiased sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnaq_dist._dgl import dgl
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, build_graph_from_arrays
from gnaq_dist.propagation import SAMPLED_DEGREE, propagate_blocks, propagate_full
from gnaq_dist.sampling import NeighborBlockSampler

N_USERS, N_ITEMS, DIM, LAYERS = 15, 11, 4, 3


def random_graph(seed: int = 0, p: float = 0.3) -> tuple[BipartiteGraph, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = rng.random((N_USERS, N_ITEMS)) < p
    mask[0, :] = False  # user 0 isolated
    users, items = np.nonzero(mask)
    g = build_graph_from_arrays(N_USERS, N_ITEMS, users, items)
    n = N_USERS + N_ITEMS
    a = np.zeros((n, n))
    a[users, items + N_USERS] = a[items + N_USERS, users] = 1.0
    inv = 1.0 / np.sqrt(np.maximum(a.sum(1), 1.0))
    return g, inv[:, None] * a * inv[None, :]


def tanh_layer(h: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.tanh(h) * (layer + 1)


def test_full_matches_dense_reference_forward_and_gradient() -> None:
    g, a_hat = random_graph()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((g.n_nodes, DIM))
    weights = [rng.standard_normal((g.n_nodes, DIM)) for _ in range(LAYERS + 1)]
    x0 = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    layers = propagate_full(g, x0, LAYERS)
    loss = sum((q * torch.tensor(w, dtype=torch.float32)).sum() for q, w in zip(layers, weights))
    loss.backward()
    ref, h = [], x
    for _ in range(LAYERS + 1):
        ref.append(h)
        h = a_hat @ h
    for q, r in zip(layers, ref):
        np.testing.assert_allclose(q.detach().numpy(), r, atol=1e-5)
    # d/dx sum_l <A^l x, W_l> = sum_l A^l W_l (A symmetric)
    grad = sum(np.linalg.matrix_power(a_hat, l) @ w for l, w in enumerate(weights))
    np.testing.assert_allclose(x0.grad.numpy(), grad, atol=1e-5)
    assert not layers[1][0].any()  # the isolated user gets nothing


def test_full_with_layer_fn_matches_dense_reference() -> None:
    g, a_hat = random_graph()
    x = np.random.default_rng(2).standard_normal((g.n_nodes, DIM))
    x0 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    layers = propagate_full(g, x0, LAYERS, tanh_layer)
    q = np.tanh(x)
    for layer in range(LAYERS + 1):
        np.testing.assert_allclose(layers[layer].detach().numpy(), q, atol=1e-10)
        q = np.tanh(a_hat @ q) * (layer + 2)
    # gradient against torch autograd through a dense A_hat
    xd = x0.detach().clone().requires_grad_(True)
    ad = torch.tensor(a_hat)
    qd, loss_ref = tanh_layer(xd, 0), 0.0
    for layer in range(LAYERS + 1):
        loss_ref = loss_ref + (qd**2).sum() * (layer + 1)
        qd = tanh_layer(ad @ qd, layer + 1)
    sum((q**2).sum() * (l + 1) for l, q in enumerate(layers)).backward()
    loss_ref.backward()
    torch.testing.assert_close(x0.grad, xd.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("layer_fn", [None, tanh_layer])
def test_blocks_with_full_fanout_equal_full_graph(layer_fn) -> None:
    g, _ = random_graph()
    x = torch.randn(g.n_nodes, DIM, generator=torch.Generator().manual_seed(3))
    seeds = torch.tensor([3, 0, 20, 15, 7])  # includes the isolated user
    input_nodes, blocks = NeighborBlockSampler(g, [-1] * LAYERS, num_layers=LAYERS).sample(seeds)
    x_full = x.clone().requires_grad_(True)
    full = propagate_full(g, x_full, LAYERS, layer_fn)
    x_in = x[input_nodes].clone().requires_grad_(True)
    sampled = propagate_blocks(blocks, x_in, LAYERS, layer_fn)
    assert len(sampled) == LAYERS + 1
    weights = torch.randn(LAYERS + 1, len(seeds), DIM, generator=torch.Generator().manual_seed(4))
    for layer in range(LAYERS + 1):
        torch.testing.assert_close(sampled[layer], full[layer][seeds], atol=1e-5, rtol=1e-5)
    sum((s * w).sum() for s, w in zip(sampled, weights)).backward()
    sum((f[seeds] * w).sum() for f, w in zip(full, weights)).backward()
    scattered = torch.zeros_like(x).index_add_(0, input_nodes, x_in.grad)
    torch.testing.assert_close(scattered, x_full.grad, atol=1e-5, rtol=1e-5)
    assert x_full.grad.abs().sum() > 0


@pytest.fixture
def one_thread():
    """Many tiny sampling calls: on a loaded 2-core machine each OpenMP region costs ~20 ms."""
    before = torch.get_num_threads()
    dgl.utils.set_num_threads(1)  # one OpenMP pool, shared with torch
    yield
    dgl.utils.set_num_threads(before)
    torch.set_num_threads(before)


def test_sampled_aggregation_is_unbiased(one_thread) -> None:
    """Mean over trials of the fan-out-2 output tends to the full output; unweighted does not.

    With T trials each entry's mean has standard error sd / sqrt(T); the tolerance is 6
    of them (per-entry chance of failing ~ 2e-9). Without the deg/s factor the mean is
    (2 / deg) of the full value, with deg >= 4 and positive inputs: far outside that.
    """
    g, _ = random_graph(seed=5, p=0.6)
    seeds = torch.arange(1, g.n_nodes)
    assert g.degree[seeds].min() >= 4
    x = torch.rand(g.n_nodes, DIM, generator=torch.Generator().manual_seed(6)) + 0.5
    full = propagate_full(g, x, 1)[1][seeds]
    sampler = NeighborBlockSampler(g, [2])
    dgl.seed(11)
    trials, unweighted = [], []
    for _ in range(400):
        input_nodes, blocks = sampler.sample(seeds)
        out = propagate_blocks(blocks, x[input_nodes], 1)[1]
        block = blocks[0]
        assert torch.equal(block.dstdata[SAMPLED_DEGREE], torch.full((len(seeds),), 2.0))
        trials.append(out)
        unweighted.append(out * block.dstdata[SAMPLED_DEGREE][:, None] / g.degree[seeds][:, None])
    stack = torch.stack(trials).double()
    stderr = stack.std(0) / np.sqrt(len(trials))
    tol = 6 * stderr + 1e-6
    assert bool(((stack.mean(0) - full).abs() <= tol).all())
    assert bool(((torch.stack(unweighted).double().mean(0) - full).abs() > 3 * tol).all())  # fails the check above


def test_block_count_must_match_layers() -> None:
    g, _ = random_graph()
    input_nodes, blocks = NeighborBlockSampler(g, [2, 2]).sample(torch.tensor([1, 2]))
    with pytest.raises(GnaqInputError):
        propagate_blocks(blocks, torch.zeros(len(input_nodes), DIM), 3)
    with pytest.raises(GnaqInputError):
        propagate_blocks(blocks, torch.zeros(len(input_nodes) + 1, DIM), 2)
    with pytest.raises(GnaqInputError):
        propagate_full(g, torch.zeros(3, DIM), 2)
