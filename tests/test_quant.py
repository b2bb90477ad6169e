"""Embedding methods: forward values, exact gradients, training, refinement, factory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant import build_method
from gnaq_dist.quant.bigear import BiGeaR
from gnaq_dist.quant.gnaq import GNAQ, equal_width_codes
from gnaq_dist.quant.lsq import LSQ
from gnaq_dist.quant.n2uq import N2UQ
from gnaq_dist.quant.packing import unpack_codes_torch

N, D, L = 12, 9, 2

QUANTIZED = [
    ("gnaq", 1), ("gnaq", 2), ("gnaq", 4), ("gnaq", 8), ("gnaq_static", 2), ("gnaq_ste", 1), ("gnaq_ste", 2), ("gnaq_ste", 4),
    ("lsq", 1), ("lsq", 2), ("lsq", 4), ("lsq", 8), ("n2uq", 1), ("n2uq", 2), ("n2uq", 4), ("n2uq", 8),
]
ALL = [("fp", None), *QUANTIZED, ("bigear", 1)]


def make(name: str, bits: int | None, seed: int = 0, n: int = N, d: int = D, **opts):
    torch.manual_seed(seed)
    method = build_method(name, n, d, bits, L, **opts)
    if name != "fp":
        method.init_from_full_precision(torch.randn(n, d) * 0.3)
    return method


# -- forward ------------------------------------------------------------------------
@pytest.mark.parametrize("name,bits", ALL)
def test_forward_shape_and_dtype(name, bits):
    m = make(name, bits)
    assert m.embed(None).shape == (N, D) and m.embed(None).dtype == torch.float32
    ids = torch.tensor([3, 0, 11, 3])
    x = m.embed(ids)
    assert x.shape == (4, D) and x.dtype == torch.float32
    torch.testing.assert_close(x, m.embed(None)[ids], rtol=0, atol=0)
    assert m.name == name and m.bits == bits and m.num_nodes == N and m.dim == D


@pytest.mark.parametrize("name,bits", QUANTIZED)
def test_at_most_2b_distinct_values_per_row(name, bits):
    m = make(name, bits, n=40, d=300)
    x = m.embed(None).detach()
    distinct = [len(torch.unique(row)) for row in x]
    assert max(distinct) <= 2**bits
    assert max(distinct) >= 2  # actually quantized to several levels, not collapsed


def test_bigear_keeps_fp_layers_and_binarizes_them_per_row_when_combined():
    m = make("bigear", 1, d=50)
    layers = [m.layer_fn(m.embed(None) * (l + 1), l) for l in range(L + 1)]
    torch.testing.assert_close(layers[1], m.embed(None) * 2, rtol=0, atol=0)  # layer_fn is the identity: fp layers
    out = m.combine(layers).detach()
    assert out.shape == (N, (L + 1) * 50)
    for l, h in enumerate(layers):
        q = out[:, l * 50:(l + 1) * 50] / ((l + 1) / (L + 1))
        assert all(len(torch.unique(row)) <= 2 for row in q)
        torch.testing.assert_close(q.abs().amax(1), h.detach().abs().mean(1))
        torch.testing.assert_close(torch.sign(q), torch.where(h.detach() >= 0, 1.0, -1.0))


def test_mean_combine_for_non_bigear():
    m = make("gnaq", 2)
    a, b = torch.randn(N, D), torch.randn(N, D)
    torch.testing.assert_close(m.combine([a, b]), (a + b) / 2)
    assert m.layer_fn(a, 1) is a


# -- GNAQ gradients -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["gnaq", "gnaq_static"])
def test_gnaq_gradient_reaches_levels_only_and_rows_without_upstream_stay_zero(name):
    m = make(name, 2)
    g = torch.randn(N, D)
    g[5] = 0.0
    (m.embed(None) * g).sum().backward()
    assert m.levels.grad is not None and m.levels.grad.abs().sum() > 0
    assert torch.all(m.levels.grad[5] == 0)
    assert not m.codes.requires_grad and m.codes.dtype == torch.uint8
    # The reference variant adds one score bias a node (a row parameter after the levels).
    rows = [m.levels, m.bias] if name == "gnaq" else [m.levels]
    assert m.bias is None if name == "gnaq_static" else m.bias.shape == (N,)
    assert [id(p) for p in m.parameters()] == [id(p) for p in rows]
    assert [id(p) for p in m.trainable_row_params()] == [id(p) for p in rows] and m.dense_params() == []
    assert len(m.row_buffers()) == 1 and m.row_buffers()[0] is m.packed_codes
    # Held packed, four 2-bit codes a byte: N x ceil(d / 4) bytes, not N x d.
    assert m.packed_codes.dtype == torch.uint8 and m.packed_codes.shape == (m.num_nodes, (m.dim + 3) // 4)
    assert torch.equal(unpack_codes_torch(m.packed_codes, 2, m.dim), m.codes)


def test_gnaq_level_gradient_matches_hand_formula():
    m = GNAQ(2, 5, bits=2, num_layers=1, phi="tanh")
    with torch.no_grad():
        m.levels.copy_(torch.tensor([[-1.0, -0.2, 0.3, 1.5], [0.1, 0.2, 0.4, 0.8]]))
        m.codes = torch.tensor([[0, 2, 2, 3, 0], [1, 1, 1, 1, 3]], dtype=torch.uint8)
    g = torch.tensor([[0.5, -1.0, 2.0, 3.0, 0.25], [1.0, 2.0, 3.0, 4.0, -1.0]])
    x = m.embed(torch.tensor([0, 1]))
    c = m.levels.detach()
    torch.testing.assert_close(x.detach(), torch.tanh(torch.gather(c, 1, m.codes.long())))
    (x * g).sum().backward()
    expected = torch.zeros(2, 4)
    for i in range(2):
        for k in range(4):
            sel = m.codes[i].long() == k
            expected[i, k] = (1 - torch.tanh(c[i, k]) ** 2) * g[i][sel].sum()
    torch.testing.assert_close(m.levels.grad, expected)
    assert expected[0, 1] == 0 and expected[1, 0] == 0  # unused levels get nothing


def test_gnaq_ste_latent_gets_upstream_gradient_exactly():
    m = make("gnaq_ste", 2)
    g = torch.randn(N, D)
    ids = torch.tensor([1, 4, 7])
    (m.embed(ids) * g[:3]).sum().backward()
    expected = torch.zeros(N, D)
    expected[ids] = g[:3]
    torch.testing.assert_close(m.latent.grad, expected, rtol=0, atol=0)
    assert m.levels.grad is not None and m.levels.grad[ids].abs().sum() > 0
    assert m.levels.grad[0].abs().sum() == 0
    # forward value is the quantized one, codes re-derived from the latent table (identity phi)
    codes = equal_width_codes(m.latent.detach(), 4)
    assert m.phi_name == "identity"
    torch.testing.assert_close(m.embed(None).detach(), torch.gather(m.levels.detach(), 1, codes.long()))


def test_gnaq_ste_codes_follow_latent_and_refine_is_noop():
    m = make("gnaq_ste", 2, phi="identity")
    before = m.pack(torch.float32).unpacked_codes().copy()
    m.refine(torch.arange(N), torch.randn(N, D))
    assert np.array_equal(m.pack(torch.float32).unpacked_codes(), before)
    with torch.no_grad():
        m.latent[0] = torch.arange(D, dtype=torch.float32)  # ascending row -> ascending codes
    codes = m.pack(torch.float32).unpacked_codes()[0]
    assert codes[0] == 0 and codes[-1] == 3 and np.all(np.diff(codes.astype(int)) >= 0)


# -- LSQ / N2UQ / BiGeaR gradients ---------------------------------------------------------
def test_lsq_step_gradient_matches_paper_formula():
    m = LSQ(1, 5, bits=2, num_layers=1)  # Q_N = 2, Q_P = 1
    with torch.no_grad():
        m.latent.copy_(torch.tensor([[-3.0, -0.4, 0.2, 0.6, 2.0]]))
        m.step.fill_(1.0)
    x = m.embed(None)
    torch.testing.assert_close(x.detach(), torch.tensor([[-2.0, 0.0, 0.0, 1.0, 1.0]]))
    x.sum().backward()
    # outside: -Q_N, inside: round(v) - v, above: Q_P; g = 1/sqrt(5 * 1)
    expected = (-2.0 + 0.4 - 0.2 + 0.4 + 1.0) / math.sqrt(5.0)
    torch.testing.assert_close(m.step.grad, torch.tensor([expected]))
    torch.testing.assert_close(m.latent.grad, torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]]))
    assert m.dense_params() == [m.step] and m.trainable_row_params() == [m.latent]


def test_lsq_one_bit_is_binary_and_per_row_step_is_a_row_param():
    m = make("lsq", 1, per_row=True)
    x = m.embed(None).detach()
    torch.testing.assert_close(x.abs(), m.step.detach().expand(N, D))
    assert m.trainable_row_params() == [m.latent, m.step] and m.dense_params() == []
    with torch.no_grad():
        m.latent.copy_(torch.randn(N, D) * 0.3)
    m.embed(None).sum().backward()
    assert m.step.grad.shape == (N, 1) and m.step.grad.abs().sum() > 0


def test_lsq_init_step():
    m = LSQ(3, 4, bits=4)
    e = torch.randn(3, 4)
    m.init_from_full_precision(e)
    torch.testing.assert_close(m.step.detach(), (2 * e.abs().mean() / math.sqrt(7)).reshape(1))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_n2uq_slope_in_each_segment_is_inverse_interval_over_n(bits):
    m = N2UQ(1, 1, bits=bits)
    n = 2**bits - 1
    a = torch.linspace(0.5, 2.0, n)
    with torch.no_grad():
        m.interval_raw.copy_(torch.log(torch.expm1(a - 1e-4)))  # softplus^-1, minus the floor
        m.threshold_offset.fill_(-1.0)
        m.out_offset.fill_(0.0)
        m.out_scale.fill_(1.0)
    torch.testing.assert_close(m.intervals().detach(), a)
    p = m.breakpoints().detach()
    mids = (p[:-1] + 0.25 * (p[1:] - p[:-1])).reshape(-1, 1)  # inside each segment
    outside = torch.tensor([[p[0] - 0.5], [p[-1] + 0.5]])
    w = torch.cat([mids, outside]).requires_grad_(True)
    y = m._output(m._levels_y(w))
    (grad,) = torch.autograd.grad(y.sum(), w)
    torch.testing.assert_close(grad[:n, 0], (1.0 / n) / a)
    assert torch.all(grad[n:] == 0)
    # forward: uniform levels with the non-uniform thresholds at segment midpoints
    torch.testing.assert_close(y.detach()[:n, 0], torch.arange(n, dtype=torch.float32) / n)
    torch.testing.assert_close(y.detach()[n:, 0], torch.tensor([0.0, 1.0]))


def test_n2uq_gradients_reach_all_dense_params():
    m = make("n2uq", 2)
    (m.embed(None) * torch.randn(N, D)).sum().backward()
    for p in m.dense_params() + m.trainable_row_params():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_bigear_backward_is_the_clamped_gaussian():
    a = 2.0
    m = BiGeaR(2, 3, num_layers=0, gaussian_a=a)
    h = torch.tensor([[0.3, -0.1, 0.6], [-0.2, 0.0, 0.5]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]])
    q = m.combine([h])  # one layer, weight 1
    hd = h.detach()
    torch.testing.assert_close(q.detach(), torch.where(hd >= 0, 1.0, -1.0) * hd.abs().mean(1, keepdim=True))
    (q * g).sum().backward()
    expected = g * ((a / math.sqrt(math.pi)) * torch.exp(-((a * hd) ** 2))).clamp(1e-8, 1.0)
    torch.testing.assert_close(h.grad, expected)
    assert m.trainable_row_params() == [m.weight] and m.row_buffers() == [m.teacher]


# -- training ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,bits", ALL)
def test_adam_steps_decrease_a_toy_loss(name, bits):
    m = make(name, bits)
    torch.manual_seed(1)
    target = torch.randn(N, D) * 0.3

    def loss_fn() -> torch.Tensor:
        out = m.combine([m.layer_fn(m.embed(None), 0)])
        return ((out - target) ** 2).mean()

    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    with torch.no_grad():
        start = float(loss_fn())
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss_fn())
    assert math.isfinite(end) and end < 0.9 * start


# -- refinement and initialisation -----------------------------------------------------------
def test_refine_reassigns_codes_of_given_rows_from_propagated_bins():
    m = make("gnaq", 2)
    levels_before = m.levels.detach().clone()
    codes_before = m.codes.clone()
    ids = torch.tensor([2, 6])
    h = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8], [8.0, 7, 6, 5, 4, 3, 2, 1, 0]])
    m.refine(ids, h)
    # bins of [0, 8] of width 2: 0,1 -> 0; 2,3 -> 1; 4,5 -> 2; 6,7,8 -> 3
    expected = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3], dtype=torch.uint8)
    assert torch.equal(m.codes[2], expected) and torch.equal(m.codes[6], expected.flip(0))
    others = torch.ones(N, dtype=torch.bool)
    others[ids] = False
    assert torch.equal(m.codes[others], codes_before[others])
    assert torch.equal(m.levels.detach(), levels_before)
    with pytest.raises(GnaqInputError):
        m.refine(ids, torch.zeros(3, D))


def test_gnaq_init_follows_paper_formula_identity_phi():
    m = GNAQ(2, 5, bits=2, phi="identity")
    e = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.7, 0.7, 0.7, 0.7, 0.7]])
    m.init_from_full_precision(e)
    torch.testing.assert_close(m.levels.detach()[0], torch.tensor([0.8, 1.6, 2.4, 3.2]))
    assert m.codes[0].tolist() == [0, 1, 2, 3, 3]
    assert m.codes[1].tolist() == [0] * 5  # M == m: code 0, no NaN
    torch.testing.assert_close(m.levels.detach()[1], torch.full((4,), 0.7))
    assert torch.isfinite(m.embed(None)).all()


def test_gnaq_levels_start_in_the_value_domain_and_tanh_applies_to_them():
    """The reference code: levels m + (k+1)(M-m)/5 of the raw warm-up row, codes its bins, x = tanh(c[q])."""
    m = GNAQ(1, 4, bits=2)  # variant gnaq: phi = tanh
    assert m.phi_name == "tanh"
    e = torch.tensor([[-0.5, 0.0, 0.25, 2.0]])
    m.init_from_full_precision(e)
    torch.testing.assert_close(m.levels.detach()[0], torch.tensor([0.0, 0.5, 1.0, 1.5]))
    # bins of [-0.5, 2.0], width 0.625: -0.5 -> 0, 0.0 -> 0, 0.25 -> 1, 2.0 -> 3
    assert m.codes[0].tolist() == [0, 0, 1, 3]
    torch.testing.assert_close(m.embed(None).detach()[0], torch.tanh(torch.tensor([0.0, 0.0, 0.5, 1.5])))
    assert torch.equal(m.bias.detach(), torch.zeros(1))


def test_quantized_start_is_close_to_the_warm_up_table():
    torch.manual_seed(0)
    e = torch.randn(200, 64) * 0.1
    for name, bits in [("gnaq", 4), ("gnaq_ste", 4), ("lsq", 4), ("n2uq", 4)]:
        m = build_method(name, 200, 64, bits, 3)
        m.init_from_full_precision(e)
        err = float(((m.embed(None).detach() - e) ** 2).mean() / (e**2).mean())
        assert err < 0.1, (name, err)


def test_init_rejects_wrong_shape():
    m = make("gnaq", 2)
    with pytest.raises(GnaqInputError):
        m.init_from_full_precision(torch.zeros(N + 1, D))


# -- factory -----------------------------------------------------------------------------
def test_build_method_validation():
    with pytest.raises(GnaqInputError, match="unknown embedding method"):
        build_method("nope", 4, 4, 2, 1)
    for name in ("gnaq", "gnaq_ste", "lsq", "n2uq"):
        with pytest.raises(GnaqInputError, match="bit width"):
            build_method(name, 4, 4, 3, 1)
        with pytest.raises(GnaqInputError):
            build_method(name, 4, 4, None, 1)
    with pytest.raises(GnaqInputError):
        build_method("bigear", 4, 4, 2, 1)
    with pytest.raises(GnaqInputError):
        build_method("fp", 4, 4, 2, 1)
    with pytest.raises(GnaqInputError, match="unknown option"):
        build_method("gnaq", 4, 4, 2, 1, fi="tanh")
    with pytest.raises(GnaqInputError):
        build_method("gnaq", 4, 4, 2, 1, phi="relu")
    assert build_method("fp", 4, 4, 32, 1).name == "fp"
    assert build_method("bigear", 4, 4, None, 1).bits == 1
    assert build_method("lsq", 4, 4, 2, 1, phi="tanh").name == "lsq"  # trainer-wide options are accepted
    assert build_method("gnaq_ste", 4, 4, 2, 1).straight_through


def test_fp_is_seeded_normal():
    torch.manual_seed(3)
    a = build_method("fp", 500, 64, None, 3).embed(None).detach()
    torch.manual_seed(3)
    b = build_method("fp", 500, 64, None, 3).embed(None).detach()
    assert torch.equal(a, b)
    assert abs(float(a.std()) - 0.1) < 0.005 and abs(float(a.mean())) < 0.005


def test_init_normal_rows_equals_the_rows_of_the_whole_table_and_leaves_the_stream_alike():
    from gnaq_dist.quant.base import init_normal_rows, init_normal_table

    rows = torch.randperm(10_001, generator=torch.Generator().manual_seed(1))[:3_000]
    torch.manual_seed(7)
    whole = init_normal_table(10_001, 8)
    after_whole = torch.randn(4)
    torch.manual_seed(7)
    # 999 rows of d = 8 round to 1,000 (16-value boundaries); the 1-row tail joins the last chunk
    mine = init_normal_rows(10_001, 8, rows, chunk_rows=999)
    after_rows = torch.randn(4)
    assert torch.equal(mine, whole[rows])
    assert torch.equal(after_rows, after_whole)
    assert init_normal_rows(10, 8, torch.empty(0, dtype=torch.int64)).shape == (0, 8)
