"""Bit packing, dequantization equality with training, load/pack round trips, byte counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import build_graph
from gnaq_dist.interactions import InteractionData
from gnaq_dist.propagation import propagate_full
from gnaq_dist.quant import build_method, storage_report
from gnaq_dist.quant.packing import (
    PackedTable,
    pack_codes,
    pack_codes_torch,
    packed_row_bytes,
    unpack_codes,
    unpack_codes_torch,
)

QUANTIZED = [
    ("gnaq", 1), ("gnaq", 2), ("gnaq", 4), ("gnaq", 8), ("gnaq_ste", 2), ("gnaq_ste", 4),
    ("lsq", 1), ("lsq", 2), ("lsq", 4), ("lsq", 8), ("n2uq", 1), ("n2uq", 2), ("n2uq", 8),
]


def make(name, bits, n=30, d=13, seed=0, **opts):
    torch.manual_seed(seed)
    m = build_method(name, n, d, bits, 2, **opts)
    m.init_from_full_precision(torch.randn(n, d) * 0.3)
    return m


def tiny_graph(n_users=5, n_items=7, seed=0):
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, 20)])
    items = np.concatenate([np.arange(n_users) % n_items, rng.integers(0, n_items, 20)])
    empty = np.zeros(0, dtype=np.int64)
    return build_graph(InteractionData(n_users, n_items, users, items, empty, empty))


# -- bit packing -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [1, 3, 7, 13, 64])
def test_pack_unpack_round_trip_numpy_and_torch(bits, dim):
    rng = np.random.default_rng(bits * 100 + dim)
    codes = rng.integers(0, 2**bits, size=(6, dim)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (6, (dim * bits + 7) // 8)
    assert np.array_equal(unpack_codes(packed, bits, dim), codes)
    packed_t = pack_codes_torch(torch.from_numpy(codes), bits)
    assert np.array_equal(packed_t.numpy(), packed)
    assert torch.equal(unpack_codes_torch(packed_t, bits, dim), torch.from_numpy(codes))


def test_packing_is_little_endian_within_a_byte():
    assert pack_codes(np.array([[1, 2, 3, 0, 3]], dtype=np.uint8), 2).tolist() == [[0b00111001, 0b00000011]]
    assert pack_codes(np.array([[1, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=np.uint8), 1).tolist() == [[0x81, 0x01]]
    assert pack_codes(np.array([[0xA, 0x5, 0xF]], dtype=np.uint8), 4).tolist() == [[0x5A, 0x0F]]
    assert pack_codes(np.array([[200, 7]], dtype=np.uint8), 8).tolist() == [[200, 7]]


def test_packing_rejects_bad_input():
    with pytest.raises(GnaqInputError):
        pack_codes(np.array([[4]], dtype=np.uint8), 2)
    with pytest.raises(GnaqInputError):
        pack_codes(np.zeros((2, 2), dtype=np.uint8), 3)
    with pytest.raises(GnaqInputError):
        unpack_codes(np.zeros((2, 3), dtype=np.uint8), 2, 64)
    with pytest.raises(GnaqInputError):
        PackedTable("gnaq", 2, 4, 2, np.zeros((2, 1), np.uint8), np.zeros((2, 1, 3), np.float16))


# -- dequantize equals training time ------------------------------------------------------
@pytest.mark.parametrize("name,bits", QUANTIZED)
def test_dequantize_reproduces_training_embeddings(name, bits):
    m = make(name, bits)
    x = m.embed(None).detach()
    t32 = m.pack(torch.float32)
    assert t32.levels.dtype == np.float32 and t32.needs_propagation
    assert np.array_equal(t32.dequantize(), x.numpy())  # exact
    t16 = m.pack(torch.float16)
    assert t16.levels.dtype == np.float16
    assert np.array_equal(t16.dequantize(), x.to(torch.float16).to(torch.float32).numpy())
    rows = np.array([4, 0, 29])
    assert np.array_equal(t32.dequantize(rows), x.numpy()[rows])


def test_dequantize_after_training_steps_and_refine():
    m = make("gnaq", 2, phi="tanh")
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        (m.embed(None) ** 3).sum().backward()
        opt.step()
        m.refine(torch.arange(30), torch.randn(30, 13))
    assert np.array_equal(m.pack(torch.float32).dequantize(), m.embed(None).detach().numpy())


def test_bigear_packs_binarized_layers_of_the_propagation():
    graph = tiny_graph()
    torch.manual_seed(0)
    m = build_method("bigear", graph.n_nodes, 6, 1, 2, graph=graph)
    with pytest.raises(GnaqInputError):
        build_method("bigear", graph.n_nodes, 6, 1, 2).pack()  # no graph, nothing loaded
    layers = propagate_full(graph, m.embed(None), 2, m.layer_fn)  # fp layers
    table = m.pack(torch.float32)
    assert table.groups == 3 and not table.needs_propagation and table.group_weights == [1 / 3, 2 / 3, 1.0]
    deq = table.dequantize()
    binarized = [torch.where(h >= 0, 1.0, -1.0) * h.abs().mean(1, keepdim=True) for h in layers]
    assert np.array_equal(deq, torch.cat(binarized, 1).detach().numpy())
    weighted = (deq.reshape(-1, 3, 6) * np.array(table.group_weights, dtype=np.float32)[None, :, None]).reshape(-1, 18)
    np.testing.assert_allclose(weighted, m.combine(layers).detach().numpy(), rtol=1e-6)
    assert table.levels.shape == (graph.n_nodes, 3, 2)
    # round trip through load_packed: the packed layers are kept for inference
    other = build_method("bigear", graph.n_nodes, 6, 1, 2)
    other.load_packed(m.pack(torch.float16))
    again = other.pack(torch.float16)
    assert np.array_equal(again.codes, m.pack(torch.float16).codes)
    assert np.array_equal(again.levels, m.pack(torch.float16).levels)


# -- load_packed round trips ------------------------------------------------------------------
@pytest.mark.parametrize("name,bits", QUANTIZED + [("lsq", 2)])
@pytest.mark.parametrize("level_dtype", [torch.float16, torch.float32])
def test_load_packed_round_trips(name, bits, level_dtype):
    opts = {"per_row": True} if name == "lsq" and bits == 2 and level_dtype == torch.float32 else {}
    m = make(name, bits, **opts)
    table = m.pack(level_dtype)
    other = make(name, bits, seed=7, **opts)
    other.load_packed(table)
    again = other.pack(level_dtype)
    assert np.array_equal(again.codes, table.codes)
    stored = table.levels.astype(np.float32)
    # float32: exact up to a few ulps (tanh(atanh(y)), an affine grid re-derived from two
    # levels); float16: within float16 rounding of the largest level.
    tol = 1e-6 if level_dtype == torch.float32 else 1e-3 * float(np.abs(stored).max())
    np.testing.assert_allclose(again.levels.astype(np.float32), stored, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(other.embed(None).detach().numpy(), table.dequantize(), rtol=1e-5, atol=tol)


def test_load_packed_rejects_other_method_or_shape():
    table = make("gnaq", 2).pack()
    with pytest.raises(GnaqInputError):
        make("lsq", 2).load_packed(table)
    with pytest.raises(GnaqInputError):
        make("gnaq", 2, n=31).load_packed(table)
    with pytest.raises(GnaqInputError):
        make("gnaq", 4).load_packed(table)


def test_state_dict_round_trip():
    table = make("gnaq", 2).pack()
    back = PackedTable.from_state(table.to_state())
    assert np.array_equal(back.codes, table.codes) and np.array_equal(back.levels, table.levels)
    assert back.method == "gnaq" and back.bits == 2 and back.dim == 13


# -- storage accounting ---------------------------------------------------------------------
def test_gnaq_2bit_d64_fp16_is_24_bytes_per_node():
    t = make("gnaq_static", 2, n=100, d=64).pack(torch.float16)
    assert t.bytes_per_node() == 24.0  # 64*2/8 code bytes + 4 levels * 2 bytes
    assert t.fp32_bytes() == 100 * 256
    assert t.compression_ratio() == pytest.approx(256 / 24)
    rep = storage_report(t)
    assert rep["code_bytes_per_node"] == 16 and rep["level_bytes_per_node"] == 8
    assert rep["floor_bytes_per_node"] == 24 and rep["fp32_bytes_per_node"] == 256
    # gnaq stores one score bias a node beside its levels, in the levels' dtype.
    g = make("gnaq", 2, n=100, d=64).pack(torch.float16)
    assert g.bias.dtype == np.float16 and g.bias.shape == (100,) and g.bytes_per_node() == 26.0
    rep = storage_report(g)
    assert rep["bias_bytes_per_node"] == 2 and rep["bytes_per_node"] == rep["floor_bytes_per_node"] == 26
    assert rep["compression_ratio"] == pytest.approx(256 / 26)


def test_bytes_for_other_widths_and_shared_codebooks():
    assert make("gnaq_static", 2, n=10, d=64).pack(torch.float32).bytes_per_node() == 16 + 16
    assert make("gnaq", 2, n=10, d=64).pack(torch.float32).bytes_per_node() == 16 + 16 + 4  # + the bias
    assert make("gnaq_static", 1, n=10, d=64).pack(torch.float16).bytes_per_node() == 8 + 4
    assert make("gnaq_static", 8, n=10, d=64).pack(torch.float16).bytes_per_node() == 64 + 512
    assert make("gnaq", 2, n=10, d=13).pack(torch.float16).codes.shape == (10, 4)  # 26 bits -> 4 bytes
    lsq = make("lsq", 2, n=1000, d=64).pack(torch.float16)  # per-tensor codebook, stored once
    assert lsq.levels.shape == (1, 1, 4) and lsq.bytes_total() == 1000 * 16 + 8
    assert make("lsq", 2, n=10, d=64, per_row=True).pack(torch.float16).bytes_per_node() == 24
    n2uq = make("n2uq", 4, n=100, d=64).pack(torch.float16)
    assert n2uq.bytes_total() == 100 * 32 + 16 * 2
    assert packed_row_bytes(7, 1) == 1 and packed_row_bytes(9, 1) == 2 and packed_row_bytes(3, 4) == 2


def test_bigear_bytes_count_all_layers():
    graph = tiny_graph()
    m = build_method("bigear", graph.n_nodes, 64, 1, 3, graph=graph)
    t = m.pack(torch.float16)
    assert t.bytes_per_node() == 4 * 8 + 4 * 2 * 2  # 4 binarized layers of 64 bits + {-a, +a} each
    assert t.compression_ratio() == pytest.approx(256 / 48)


def test_zero_rows_unpack_to_zero_rows():
    """A worker with nothing to send still encodes/decodes an empty message."""
    import numpy as np
    import torch

    from gnaq_dist.quant.packing import pack_codes, pack_codes_torch, unpack_codes, unpack_codes_torch

    for bits in (1, 2, 4, 8):
        empty = pack_codes(np.zeros((0, 5), dtype=np.uint8), bits)
        assert unpack_codes(empty, bits, 5).shape == (0, 5)
        empty_t = pack_codes_torch(torch.zeros((0, 5), dtype=torch.uint8), bits)
        assert tuple(unpack_codes_torch(empty_t, bits, 5).shape) == (0, 5)
