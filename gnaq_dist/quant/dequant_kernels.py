"""Packed rows to float rows and back to level gradients, each in one pass (numba).

Why: a split training step turns every row it propagates (own and halo) from packed codes +
per-row levels into an (n, d) float table, and the backward sums the table's gradient into each
row's levels. In torch that is an unpack (a uint8 code per value), an int64 index per block
(8 bytes per value) for ``gather`` and again for ``scatter_add_``; here each row is read once,
from its packed bytes.

Without numba the same results come from torch (:func:`dequantize_rows_torch`,
:func:`level_gradients_torch`), which the tests also use as the reference.

Layout (``gnaq_dist.quant.packing``): code ``j`` of a row sits in byte ``j*b // 8`` at bit
offset ``j*b % 8``; ``levels`` is (n or 1, groups * 2^b) float32, value ``j`` of a row reads
level ``(j // dim) * 2^b + code_j`` (one group per ``dim`` values; GNAQ has one group).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.packing import SUPPORTED_BITS, packed_row_bytes, unpack_codes_torch

log = logging.getLogger(__name__)

#: The torch path's int64 index, made per block of rows of at most this many bytes: below
#: glibc's 32 MiB mmap ceiling a freed block is reused, not faulted in afresh each time.
BLOCK_BYTES = 8 << 20


def compile_with_numba(build: Callable[[Any, bool], Any], what: str) -> Any | None:
    """``build(numba, cache)``'s kernels, cached on disk where numba can write its cache (else
    compiled in this process), or None where numba is missing (``what`` names them in the log)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; this keeps a bare torch usable
        log.info("numba not installed: %s run in torch (slower)", what)
        return None
    try:
        return build(numba, True)
    except RuntimeError as exc:  # numba finds no writable cache directory: compile per process
        log.info("numba cannot cache %s (%s): compiling them in this process", what, exc)
        return build(numba, False)


@functools.lru_cache(maxsize=None)
def _kernels(bits: int) -> tuple[Any, Any] | None:
    """The compiled pair (forward, backward) for ``bits`` a code, or None where numba is missing.

    ``bits`` is a constant of the compiled code (a closure variable), so the per-byte loop
    unrolls; a kernel for any bit width, shifting by a variable, is several times slower. Compiled once
    per bit width into numba's cache (it keys closures by their constants)."""
    return compile_with_numba(lambda numba, cache: _compile(numba, bits, cache), "the packed-row kernels")


def _compile(numba: Any, bits: int, cache: bool) -> tuple[Any, Any]:
    per, mask, k = 8 // bits, (1 << bits) - 1, 1 << bits
    jit = numba.njit(nogil=True, boundscheck=False, cache=cache)

    @jit
    def forward(packed, levels, dim, out):  # pragma: no cover - compiled
        n, width = out.shape
        full = width // per  # bytes whose every code is a value (a row's last may be padded)
        shared = levels.shape[0] == 1
        for r in range(n):
            lr = 0 if shared else r
            if dim == width:  # one group (GNAQ): the row's levels are its first k
                for b in range(full):
                    byte = packed[r, b]
                    for s in range(per):
                        out[r, b * per + s] = levels[lr, (byte >> (s * bits)) & mask]
                for j in range(full * per, width):
                    out[r, j] = levels[lr, (packed[r, j // per] >> ((j % per) * bits)) & mask]
            else:
                for j in range(width):
                    code = (packed[r, j // per] >> ((j % per) * bits)) & mask
                    out[r, j] = levels[lr, (j // dim) * k + code]

    @numba.njit(nogil=True, boundscheck=False, cache=cache, fastmath={"reassoc", "nsz"})
    def backward(packed, grad, dim, out):  # pragma: no cover - compiled
        n, width = grad.shape
        full = width // per
        zero = np.float32(0.0)
        for r in range(n):
            for c in range(out.shape[1]):
                out[r, c] = 0.0
            if dim == width and k == 4 and width == full * per:
                # 2 bits: four sums in registers, vectorised (the sums' order is the compiler's)
                a0 = a1 = a2 = a3 = zero
                for b in range(full):
                    byte = packed[r, b]
                    for s in range(per):
                        code = (byte >> (s * bits)) & mask
                        v = grad[r, b * per + s]
                        a0 += v * (code == 0)
                        a1 += v * (code == 1)
                        a2 += v * (code == 2)
                        a3 += v * (code == 3)
                out[r, 0], out[r, 1], out[r, 2], out[r, 3] = a0, a1, a2, a3
            elif dim == width:
                for b in range(full):
                    byte = packed[r, b]
                    for s in range(per):
                        out[r, (byte >> (s * bits)) & mask] += grad[r, b * per + s]
                for j in range(full * per, width):
                    out[r, (packed[r, j // per] >> ((j % per) * bits)) & mask] += grad[r, j]
            else:
                for j in range(width):
                    code = (packed[r, j // per] >> ((j % per) * bits)) & mask
                    out[r, (j // dim) * k + code] += grad[r, j]

    return forward, backward


def warm_up(bits: int, dim: int = 8) -> None:
    """Load (or compile) ``bits``' kernels now, for packed rows whole and sliced out of wire rows.

    Why: numba loads (or compiles) a kernel at its first call with each array layout, which
    would otherwise fall in the first training step."""
    width = dim
    code = packed_row_bytes(width, bits)
    wire = torch.zeros((2, code + 4), dtype=torch.uint8)
    levels = torch.zeros((2, 1 << bits), dtype=torch.float32)
    for packed in (wire[:, :code], wire[:, :code].contiguous()):  # strided (a wire slice) and whole
        level_gradients(packed, dequantize_rows(packed, levels, bits, width, dim), bits, dim)


def _check(packed: torch.Tensor, bits: int, width: int, dim: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise GnaqInputError(f"packed rows have 1, 2, 4 or 8 bits a code, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_row_bytes(width, bits):
        raise GnaqInputError(f"packed codes must be uint8 (n, {packed_row_bytes(width, bits)}) for {width} values "
                             f"at {bits} bits, got {packed.dtype} {tuple(packed.shape)}")
    if dim < 1 or width % dim:
        raise GnaqInputError(f"{width} values a row do not split into groups of dim {dim}")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()  # shares memory (strided views stay views)


def dequantize_rows(packed: torch.Tensor, levels: torch.Tensor, bits: int, width: int, dim: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r, j] = levels[r or 0, (j // dim) * 2^b + code[r, j]]`` as float32 (n, width).

    ``packed``: uint8 (n, packed bytes), rows may be strided (a slice of wire rows);
    ``levels``: float32 (n or 1, width // dim * 2^b); ``out``: a contiguous float32 table to
    write into, or None for a new one."""
    dim = width if dim is None else int(dim)
    _check(packed, bits, width, dim)
    n, k = int(packed.shape[0]), (width // dim) << bits
    if levels.dtype != torch.float32 or levels.dim() != 2 or levels.shape[1] != k or levels.shape[0] not in (1, n):
        raise GnaqInputError(f"levels must be float32 (n or 1, {k}), got {levels.dtype} {tuple(levels.shape)}")
    if out is None:
        out = torch.empty((n, width), dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (n, width) or not out.is_contiguous():
        raise GnaqInputError(f"out must be a contiguous float32 ({n}, {width}), got {out.dtype} {tuple(out.shape)}")
    kernels = _kernels(int(bits))
    if kernels is None or packed.device.type != "cpu":
        return dequantize_rows_torch(packed, levels, bits, width, dim, out=out)
    if n:
        kernels[0](_numpy(packed), _numpy(levels), dim, _numpy(out))
    return out


def level_gradients(packed: torch.Tensor, grad: torch.Tensor, bits: int, dim: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The backward of :func:`dequantize_rows` for per-row levels: each row's ``grad`` summed by
    the level its codes point at, float32 (n, width // dim * 2^b)."""
    width = int(grad.shape[1])
    dim = width if dim is None else int(dim)
    _check(packed, bits, width, dim)
    n, k = int(packed.shape[0]), (width // dim) << bits
    if grad.shape[0] != n:
        raise GnaqInputError(f"grad has {grad.shape[0]} rows, packed codes {n}")
    grad = grad.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty((n, k), dtype=torch.float32)
    kernels = _kernels(int(bits))
    if kernels is None or packed.device.type != "cpu":
        return level_gradients_torch(packed, grad, bits, dim, out=out)
    if n:
        kernels[1](_numpy(packed), _numpy(grad), dim, _numpy(out))
    return out


def code_counts(packed: torch.Tensor, bits: int, width: int, dim: int | None = None) -> torch.Tensor:
    """How many of each row's values use each of its levels, float32 (n, width // dim * 2^b):
    :func:`level_gradients` of a gradient of ones, a block of rows at a time (the ones table
    follows the block). Why: ``sum_j x_j^2 = sum_k count_k * level_k^2``, so an L2 term on
    dequantized rows needs the counts and the levels, not the (n, width) table."""
    dim = width if dim is None else int(dim)
    _check(packed, bits, width, dim)
    n, k = int(packed.shape[0]), (width // dim) << bits
    out = torch.empty((n, k), dtype=torch.float32)
    step = max(1, BLOCK_BYTES // (4 * max(1, width)))
    ones = torch.ones((min(step, n), width), dtype=torch.float32)
    for a in range(0, n, step):
        b = min(a + step, n)
        level_gradients(packed[a:b], ones[: b - a], bits, dim, out=out[a:b])
    return out


# -- the torch path (no numba, other devices; the tests' reference) -------------------------
def _code_blocks(packed: torch.Tensor, bits: int, width: int, dim: int):
    """``(rows, int64 level index of those rows)`` a block of rows at a time (8 MiB indices)."""
    step = max(1, BLOCK_BYTES // (8 * max(1, width)))
    group = (torch.arange(width, device=packed.device) // dim) << bits
    for a in range(0, int(packed.shape[0]), step):
        rows = slice(a, a + step)
        yield rows, unpack_codes_torch(packed[rows].contiguous(), bits, width).to(torch.int64) + group


def dequantize_rows_torch(packed: torch.Tensor, levels: torch.Tensor, bits: int, width: int, dim: int,
                          out: torch.Tensor) -> torch.Tensor:
    for rows, index in _code_blocks(packed, bits, width, dim):
        lv = levels if levels.shape[0] == 1 else levels[rows]
        torch.gather(lv.expand(index.shape[0], -1), 1, index, out=out[rows])
    return out


def level_gradients_torch(packed: torch.Tensor, grad: torch.Tensor, bits: int, dim: int,
                          out: torch.Tensor) -> torch.Tensor:
    out.zero_()
    for rows, index in _code_blocks(packed, bits, int(grad.shape[1]), dim):
        out[rows].scatter_add_(1, index, grad[rows])
    return out


__all__ = ["dequantize_rows", "dequantize_rows_torch", "level_gradients", "level_gradients_torch"]
