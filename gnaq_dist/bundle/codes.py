"""The packed code layout and its decoder (numpy only).

Code ``j`` of a row sits in byte ``j*bits // 8`` at bit offset ``j*bits % 8``,
little-endian within the byte; a row is padded with zero bits to a whole byte. The
encoder lives with the quantizers (:mod:`gnaq_dist.quant.packing`); decoding is here so
that the edge reader needs neither torch nor the quantizers.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (1, 2, 4, 8)  # code widths that tile a byte


def packed_row_bytes(width: int, bits: int) -> int:
    """Bytes of one row of ``width`` b-bit codes, padded to a whole byte."""
    return (width * bits + 7) // 8


def unpack_bits(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """(R, nbytes) uint8 -> (R, width) uint8 codes: the one decoding of the packed layout
    (``packing.unpack_codes`` validates and calls this)."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    out = (packed[:, :, None] >> shifts) & mask
    return out.reshape(packed.shape[0], per * packed.shape[1])[:, :width]  # explicit width: 0 rows ok


def dequantize_codes(codes: np.ndarray, levels: np.ndarray, bits: int, groups: int, dim: int) -> np.ndarray:
    """(R, groups*dim) float32 values: ``x[r, g*dim + j] = levels[r or 0, g, code[r, g*dim + j]]``.

    ``codes`` are packed (R, nbytes) uint8, ``levels`` (R or 1, groups, 2**bits) in the
    stored dtype; one vectorised gather, shared with ``PackedTable.dequantize``.
    """
    n = codes.shape[0]
    q = unpack_bits(codes, bits, groups * dim).reshape(n, groups, dim)
    lv = np.broadcast_to(levels.astype(np.float32), (n, groups, 1 << bits))
    return np.take_along_axis(lv, q.astype(np.intp), axis=2).reshape(n, groups * dim)


__all__ = ["SUPPORTED_BITS", "dequantize_codes", "packed_row_bytes", "unpack_bits"]
