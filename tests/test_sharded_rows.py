"""Pieces of a rank's shard that save memory in the step: the packed view's gather, its L2
from the rows of non-zero weight, and Adam moments made at the first step. Each must compute what the
plain formulation computes."""

from __future__ import annotations

import pytest
import torch

from gnaq_dist.distributed import sharded, sparse_adam
from gnaq_dist.distributed.sharded import MethodShard, RowView
from gnaq_dist.distributed.sparse_adam import RowSparseAdam
from gnaq_dist.quant.packing import pack_codes_torch, unpack_codes_torch


def _packed_view(n: int = 11, d: int = 8, levels: int = 4, seed: int = 0) -> tuple[RowView, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(n, levels, generator=g).requires_grad_(True)
    codes = torch.randint(0, levels, (n, d), generator=g, dtype=torch.uint8)
    bits = levels.bit_length() - 1
    packed = pack_codes_torch(codes, bits)
    return RowView([leaf], sharded._DequantizePacked.apply(leaf, packed, bits, d), packed, bits, d), leaf


@pytest.mark.parametrize("levels", [2, 4, 16])
def test_dequantize_packed_equals_torch_gather_forward_and_backward(levels):
    view, leaf = _packed_view(levels=levels)
    codes = unpack_codes_torch(view.packed, view.bits, view.width)
    ref_leaf = leaf.detach().clone().requires_grad_(True)
    ref = torch.gather(ref_leaf, 1, codes.long())
    assert torch.equal(view.embeddings, ref)
    w = torch.randn(ref.shape)
    (view.embeddings * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)
    assert leaf.grad.abs().sum() > 0


def test_row_l2_of_packed_rows_from_their_levels_and_codes():
    view, leaf = _packed_view()
    weights = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5, 1.0, 4.0])  # the first 7 rows (own rows)
    x = view.pop_embeddings()
    assert view.embeddings is None  # the view no longer keeps the (n, d) table alive
    ref = (weights * x[:7].pow(2).sum(1)).sum()
    got = MethodShard.row_l2(view, weights)
    torch.testing.assert_close(got, ref)
    (g_ref,) = torch.autograd.grad(ref, leaf, retain_graph=True)
    (g_got,) = torch.autograd.grad(got, leaf)
    torch.testing.assert_close(g_got, g_ref)
    assert g_got[7:].abs().sum() == 0 and g_got[:7].abs().sum() > 0
    with pytest.raises(RuntimeError, match="already taken"):
        view.pop_embeddings()


def test_row_l2_of_latent_rows_reads_the_embeddings():
    x = torch.randn(5, 4, requires_grad=True)
    view = RowView([x], x * 1.0)
    w = torch.arange(5, dtype=torch.float32)
    torch.testing.assert_close(MethodShard.row_l2(view, w), (w * x.pow(2).sum(1)).sum())


def test_adam_moments_are_made_at_the_first_step():
    p = torch.nn.Parameter(torch.ones(6, 3))
    opt = RowSparseAdam([p], lr=0.1)
    assert opt._moments is None  # a phase that never steps holds no moments
    assert opt.state_bytes() == 6 * 3 * 8 + 6 * 8
    opt.step(torch.tensor([1, 4]), [torch.ones(2, 3)])
    assert opt._moments is not None and opt.state_bytes() == 6 * 3 * 8 + 6 * 8
    assert torch.all(p.data[[1, 4]] < 1) and torch.all(p.data[[0, 2, 3, 5]] == 1)
    assert torch.all(opt.exp_avg[0][[1, 4]] > 0) and opt.exp_avg_sq[0][0].abs().sum() == 0


def test_adam_step_on_every_row_equals_the_row_indexed_step():
    """Full-graph steps touch every row in order and take the in-place path; it must give what
    the gather/scatter path gives, bit for bit, also with rows at different step counts."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(7, 4, generator=g)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_a, opt_b = RowSparseAdam([a], lr=0.05), RowSparseAdam([b], lr=0.05)
    first = torch.tensor([2, 5])  # rows 2 and 5 run one step ahead
    grad = torch.randn(2, 4, generator=g)
    opt_a.step(first, [grad])
    opt_b.step(first, [grad])
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    for _ in range(3):
        grad = torch.randn(7, 4, generator=g)
        opt_a.step(None, [grad])  # every row, in order: the in-place path
        opt_b.step(perm, [grad[perm]])  # the same rows permuted: the indexed path
        assert torch.equal(a.data, b.data)
        assert torch.equal(opt_a.exp_avg[0], opt_b.exp_avg[0])
        assert torch.equal(opt_a.exp_avg_sq[0], opt_b.exp_avg_sq[0])
        assert torch.equal(opt_a.steps, opt_b.steps)
    assert not torch.equal(a.data, start)


@pytest.mark.parametrize("shape", [(9, 5), (9, 2, 4)])
def test_adam_one_pass_update_matches_the_torch_form(shape):
    """The kernel's update (numba, one pass a row) against the torch form it replaces, on both
    paths, with rows at different step counts and a parameter of more than two axes (GNAQ's
    levels); float32 rounding may differ by an ulp (torch fuses some multiply-adds)."""
    g = torch.Generator().manual_seed(1)
    start = torch.randn(shape, generator=g)
    fused, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_f = RowSparseAdam([fused], lr=0.05)
    opt_t = RowSparseAdam([plain], lr=0.05, fused=False)
    assert sparse_adam._fused_kernel() is not None  # numba is a dependency: the kernel runs here
    opt_f.reserve()
    for step in range(4):
        rows = torch.tensor([7, 1, 4]) if step % 2 == 0 else None
        n = shape[0] if rows is None else 3
        grad = torch.randn((n,) + shape[1:], generator=g)
        opt_f.step(rows, [grad])
        opt_t.step(rows, [grad])
        torch.testing.assert_close(fused.data, plain.data, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt_f.exp_avg[0], opt_t.exp_avg[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_f.exp_avg_sq[0], opt_t.exp_avg_sq[0], rtol=1e-6, atol=1e-9)
    assert torch.equal(opt_f.steps, opt_t.steps) and opt_f.steps.tolist() == [2, 4, 2, 2, 4, 2, 2, 4, 2]
    assert not torch.equal(fused.data, start)
    untouched = [0, 2, 3, 5, 6, 8]  # rows outside [7, 1, 4] moved only at the every-row steps
    assert not torch.equal(fused.data[untouched], start[untouched])


def test_adam_leaves_a_parameter_it_cannot_run_to_the_torch_form():
    """A float64 or strided parameter goes through the torch form (the kernel is float32, rows
    contiguous); the result is the same as the reference's."""
    base = torch.randn(6, 8, dtype=torch.float64)
    p64, ref = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    opt, opt_ref = RowSparseAdam([p64], lr=0.1), RowSparseAdam([ref], lr=0.1, fused=False)
    grad = torch.ones(6, 8, dtype=torch.float64)
    assert not opt._fused(None, [grad], torch.ones(1, 1), torch.ones(1, 1))
    opt.step(None, [grad])
    opt_ref.step(None, [grad])
    assert torch.equal(p64.data, ref.data)
