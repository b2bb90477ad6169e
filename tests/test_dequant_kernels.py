"""The one-pass kernels for packed rows (gnaq_dist.quant.dequant_kernels) against the torch
formulation (unpack, int64 index, gather / scatter_add), for every bit width, one group or
several, per-row or shared levels, rows sliced out of wire rows, and widths that end inside a
byte."""

from __future__ import annotations

import pytest
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant import dequant_kernels as K
from gnaq_dist.quant.packing import pack_codes_torch, unpack_codes_torch


def _rows(n: int, width: int, bits: int, groups: int, shared: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, width), generator=g, dtype=torch.uint8)
    packed = pack_codes_torch(codes, bits)
    wire = torch.cat([packed, torch.randint(0, 255, (n, 5), generator=g, dtype=torch.uint8)], 1)
    levels = torch.randn(1 if shared else n, groups << bits, generator=g)
    return codes, wire[:, : packed.shape[1]], levels  # packed rows as a strided slice of wire rows


def _reference(codes: torch.Tensor, levels: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    n, width = codes.shape
    index = codes.long() + (torch.arange(width) // dim << bits)
    return torch.gather(levels.expand(n, -1), 1, index)


CASES = [(bits, width, groups) for bits in (1, 2, 4, 8) for width, groups in ((64, 1), (10, 1), (24, 3))]


@pytest.mark.parametrize("bits,width,groups", CASES)
@pytest.mark.parametrize("shared", [False, True])
def test_dequantize_rows_equals_gather(bits, width, groups, shared):
    dim = width // groups
    codes, packed, levels = _rows(37, width, bits, groups, shared)
    assert not packed.is_contiguous()
    ref = _reference(codes, levels, bits, dim)
    got = K.dequantize_rows(packed, levels, bits, width, dim)
    assert torch.equal(got, ref)
    out = torch.full((37, width), float("nan"))
    assert K.dequantize_rows(packed, levels, bits, width, dim, out=out) is out and torch.equal(out, ref)
    torch_path = K.dequantize_rows_torch(packed, levels, bits, width, dim, out=torch.empty(37, width))
    assert torch.equal(torch_path, ref)


@pytest.mark.parametrize("bits,width,groups", CASES)
def test_level_gradients_equal_scatter_add(bits, width, groups):
    dim = width // groups
    codes, packed, levels = _rows(37, width, bits, groups, shared=False, seed=1)
    leaf = levels.clone().requires_grad_(True)
    grad = torch.randn(37, width)
    _reference(codes, leaf, bits, dim).backward(grad)
    got = K.level_gradients(packed, grad, bits, dim)
    torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)  # 2 bits: sums in the compiler's order
    assert got.abs().sum() > 0
    torch_path = K.level_gradients_torch(packed, grad, bits, dim, out=torch.empty_like(got))
    torch.testing.assert_close(torch_path, leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,width,groups", CASES)
def test_code_counts_count_each_rows_codes_and_give_its_squared_norm(bits, width, groups, monkeypatch):
    monkeypatch.setattr(K, "BLOCK_BYTES", 4 * width * 5)  # blocks of 5 rows: several and a short last one
    dim = width // groups
    codes, packed, levels = _rows(37, width, bits, groups, shared=False, seed=2)
    counts = K.code_counts(packed, bits, width, dim)
    index = codes.long() + (torch.arange(width) // dim << bits)
    want = torch.zeros(37, groups << bits).scatter_add_(1, index, torch.ones(37, width))
    assert torch.equal(counts, want)
    x = _reference(codes, levels, bits, dim)
    torch.testing.assert_close((counts * levels.pow(2)).sum(1), x.pow(2).sum(1))


def test_torch_path_in_blocks_and_without_numba(monkeypatch):
    """Without numba the torch path serves (an int64 index per block of rows); blocks that end
    unevenly give the same values."""
    codes, packed, levels = _rows(50, 64, 2, 1, shared=False, seed=2)
    ref = _reference(codes, levels, 2, 64)
    grad = torch.randn(50, 64)
    want_grad = K.level_gradients(packed, grad, 2)
    monkeypatch.setattr(K, "_kernels", lambda bits: None)
    monkeypatch.setattr(K, "BLOCK_BYTES", 8 * 64 * 7)  # 7 rows a block
    assert torch.equal(K.dequantize_rows(packed, levels, 2, 64), ref)
    torch.testing.assert_close(K.level_gradients(packed, grad, 2), want_grad, rtol=1e-5, atol=1e-6)


def test_empty_rows_and_bad_shapes():
    codes, packed, levels = _rows(4, 64, 2, 1, shared=False)
    assert K.dequantize_rows(packed[:0], levels[:0], 2, 64).shape == (0, 64)
    assert K.level_gradients(packed[:0], torch.zeros(0, 64), 2).shape == (0, 4)
    with pytest.raises(GnaqInputError, match=r"packed codes must be uint8 \(n, 16\)"):
        K.dequantize_rows(packed[:, :8], levels, 2, 64)
    with pytest.raises(GnaqInputError, match=r"levels must be float32 \(n or 1, 4\)"):
        K.dequantize_rows(packed, levels[:, :3], 2, 64)
    with pytest.raises(GnaqInputError, match="1, 2, 4 or 8 bits"):
        K.dequantize_rows(packed, levels, 3, 64)
    with pytest.raises(GnaqInputError, match=r"out must be a contiguous float32 \(4, 64\)"):
        K.dequantize_rows(packed, levels, 2, 64, out=torch.empty(4, 65))
    with pytest.raises(GnaqInputError, match="grad has 3 rows, packed codes 4"):
        K.level_gradients(packed, torch.zeros(3, 64), 2)
    assert torch.equal(unpack_codes_torch(packed.contiguous(), 2, 64), codes)


def test_kernels_compile_in_process_where_numba_cannot_cache(monkeypatch):
    """A read-only install leaves numba no cache directory: the kernels then compile per process."""
    real, calls = K._compile, []

    def no_cache_dir(numba, bits, cache):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real(numba, bits, cache)

    monkeypatch.setattr(K, "_compile", no_cache_dir)
    K._kernels.cache_clear()
    try:
        codes, packed, levels = _rows(9, 64, 4, 1, shared=False, seed=3)
        assert torch.equal(K.dequantize_rows(packed, levels, 4, 64), _reference(codes, levels, 4, 64))
        assert calls == [True, False]
    finally:
        K._kernels.cache_clear()  # later tests compile (or load) the cached kernels again


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_warm_up_loads_the_kernels_for_whole_and_sliced_rows(bits):
    """What the training loop calls before an epoch: afterwards rows of a step, whole or sliced
    out of wire rows, run kernels already loaded (no numba compile or cache load in the step)."""
    K._kernels.cache_clear()
    forward, backward = K._kernels(bits)
    assert len(forward.signatures) == len(backward.signatures) == 0
    K.warm_up(bits)
    loaded = (len(forward.signatures), len(backward.signatures))
    assert loaded == (2, 2)  # a C-contiguous and a strided layout of the packed codes
    codes, packed, levels = _rows(300, 64, bits, 1, shared=False, seed=5)
    wire = torch.cat([packed, torch.zeros((packed.shape[0], 3), dtype=torch.uint8)], dim=1)
    for rows in (packed, wire[:, : packed.shape[1]]):
        x = K.dequantize_rows(rows, levels, bits, 64)
        assert torch.equal(x, _reference(codes, levels, bits, 64))
        K.level_gradients(rows, torch.ones_like(x), bits)
    assert (len(forward.signatures), len(backward.signatures)) == loaded
