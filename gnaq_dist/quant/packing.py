"""Storage form of a quantized embedding table: bit-packed codes plus level tables.

Why a separate module: checkpoints, inference bundles and the distributed row exchange
all ship the same bytes, so the layout is defined once: decoding is
:mod:`gnaq_dist.bundle.codes` (numpy only, shared with the edge reader), encoding here,
with torch versions for the exchange. Codes are packed
little-endian within a byte (code ``j`` of a row sits in byte ``j*b // 8`` at bit offset
``j*b % 8``): 8 one-bit, 4 two-bit, 2 four-bit or 1 eight-bit code per byte. A row's
codes are padded with zero bits to a whole byte, so rows can be sliced independently.

Sizes are counted honestly: a per-node codebook costs ``2^b`` level values per row; a
per-tensor codebook (first axis 1) is stored once and counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gnaq_dist.bundle.codes import SUPPORTED_BITS, dequantize_codes, unpack_bits
from gnaq_dist.bundle.codes import packed_row_bytes as _row_bytes
from gnaq_dist.errors import GnaqInputError


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise GnaqInputError(f"packing supports {SUPPORTED_BITS} bits, got {bits}")


def packed_row_bytes(dim: int, bits: int) -> int:
    """Bytes one row of ``dim`` b-bit codes takes (padded to a whole byte)."""
    _check_bits(bits)
    return _row_bytes(dim, bits)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(R, D) codes with values < 2**bits -> (R, ceil(D*bits/8)) uint8, little-endian in a byte."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise GnaqInputError(f"codes must be 2-D (rows, dim), got shape {codes.shape}")
    if codes.size and int(codes.max()) >= (1 << bits):
        raise GnaqInputError(f"a code is >= 2**{bits}: {int(codes.max())}")
    rows, dim = codes.shape
    per = 8 // bits
    nbytes = packed_row_bytes(dim, bits)
    padded = np.zeros((rows, nbytes * per), dtype=np.uint8)
    padded[:, :dim] = codes
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(rows, nbytes, per) << shifts, axis=2).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: (R, nbytes) uint8 -> (R, dim) uint8 codes."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != packed_row_bytes(dim, bits):
        raise GnaqInputError(
            f"packed codes must be (rows, {packed_row_bytes(dim, bits)}) for dim {dim} at {bits} bits, "
            f"got {packed.shape}"
        )
    return unpack_bits(packed, bits, dim)


def pack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Torch version of :func:`pack_codes` (any device), for shipping rows over torch.distributed."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise GnaqInputError(f"codes must be 2-D (rows, dim), got shape {tuple(codes.shape)}")
    rows, dim = codes.shape
    per = 8 // bits
    nbytes = packed_row_bytes(dim, bits)
    # uint8 throughout: a table of N rows costs N·d bytes of temporaries, not 4-8x that.
    padded = torch.zeros((rows, nbytes * per), dtype=torch.uint8, device=codes.device)
    padded[:, :dim] = codes.to(torch.uint8)
    fields = padded.reshape(rows, nbytes, per)
    out = fields[:, :, 0].clone()
    for j in range(1, per):
        out |= fields[:, :, j] << (j * bits)
    return out


def unpack_codes_torch(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Torch version of :func:`unpack_codes` (any device)."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.shape[1] != packed_row_bytes(dim, bits):
        raise GnaqInputError(
            f"packed codes must be (rows, {packed_row_bytes(dim, bits)}) for dim {dim} at {bits} bits, "
            f"got {tuple(packed.shape)}"
        )
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    out = (packed.to(torch.uint8).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    out = out.reshape(packed.shape[0], per * packed.shape[1])
    return out if out.shape[1] == dim else out[:, :dim].contiguous()


def _np_float(dtype: torch.dtype) -> type:
    if dtype == torch.float16:
        return np.float16
    if dtype == torch.float32:
        return np.float32
    raise GnaqInputError(f"level dtype must be float16 or float32, got {dtype}")


@dataclass
class PackedTable:
    """A quantized table as stored: codes (packed) and the value each code stands for.

    ``levels`` already has the activation applied (GNAQ's tanh), so dequantizing is a
    pure gather: ``x[r, g*dim + j] = levels[r or 0, g, code[r, g*dim + j]]``. ``bias``:
    one score bias a node (``gnaq``; stored as the levels are), or None.
    """

    method: str
    bits: int
    dim: int  # values per group (the embedding dimension d)
    num_rows: int
    codes: np.ndarray  # uint8 (num_rows, ceil(groups*dim*bits/8))
    levels: np.ndarray  # float16/float32 (num_rows or 1, groups, 2**bits)
    groups: int = 1  # BiGeaR: L+1 binarized layers
    needs_propagation: bool = True  # False: rows are already final-layer representations
    group_weights: list[float] | None = field(default=None)
    bias: np.ndarray | None = field(default=None)  # float16/float32 (num_rows,): per-node score bias

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        want_codes = (self.num_rows, packed_row_bytes(self.groups * self.dim, self.bits))
        if self.codes.dtype != np.uint8 or self.codes.shape != want_codes:
            raise GnaqInputError(f"codes must be uint8 {want_codes}, got {self.codes.dtype} {self.codes.shape}")
        k = 1 << self.bits
        if self.levels.ndim != 3 or self.levels.shape[0] not in (1, self.num_rows) or self.levels.shape[1:] != (
            self.groups,
            k,
        ):
            raise GnaqInputError(
                f"levels must be (num_rows or 1, {self.groups}, {k}), got {self.levels.shape}"
            )
        if self.levels.dtype not in (np.float16, np.float32):
            raise GnaqInputError(f"levels must be float16 or float32, got {self.levels.dtype}")
        if self.group_weights is not None and len(self.group_weights) != self.groups:
            raise GnaqInputError(f"group_weights needs {self.groups} entries, got {len(self.group_weights)}")
        if self.bias is not None and (self.bias.shape != (self.num_rows,)
                                      or self.bias.dtype not in (np.float16, np.float32)):
            raise GnaqInputError(f"bias must be float16 or float32 ({self.num_rows},), got "
                                 f"{self.bias.dtype} {self.bias.shape}")

    def unpacked_codes(self) -> np.ndarray:
        """(num_rows, groups*dim) uint8 codes."""
        return unpack_codes(self.codes, self.bits, self.groups * self.dim)

    def dequantize(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(num_rows, groups*dim) float32 (or only ``rows``), by one vectorised gather."""
        codes = self.codes if rows is None else self.codes[rows]
        levels = self.levels if rows is None or self.levels.shape[0] == 1 else self.levels[rows]
        return dequantize_codes(codes, levels, self.bits, self.groups, self.dim)

    def code_bytes(self) -> int:
        return int(self.codes.nbytes)

    def level_bytes(self) -> int:
        return int(self.levels.nbytes)

    def bias_bytes(self) -> int:
        return 0 if self.bias is None else int(self.bias.nbytes)

    def bytes_total(self) -> int:
        return self.code_bytes() + self.level_bytes() + self.bias_bytes()

    def bytes_per_node(self) -> float:
        return self.bytes_total() / max(self.num_rows, 1)

    def fp32_bytes(self) -> int:
        """The float32 layer-0 table this replaces: num_rows * dim * 4 (not times groups).

        For BiGeaR the packed form holds L+1 binarized layers, but the model it stands in
        for is still a d-dimensional fp32 embedding per node, so that is the baseline.
        """
        return self.num_rows * self.dim * 4

    def compression_ratio(self) -> float:
        return self.fp32_bytes() / max(self.bytes_total(), 1)

    def to_state(self) -> dict:
        """Plain dict of arrays and scalars (for checkpoint writers)."""
        return {
            "method": self.method, "bits": self.bits, "dim": self.dim, "num_rows": self.num_rows,
            "codes": self.codes, "levels": self.levels, "groups": self.groups,
            "needs_propagation": self.needs_propagation, "group_weights": self.group_weights,
            "bias": self.bias,
        }

    @classmethod
    def from_state(cls, state: dict) -> PackedTable:
        gw = state.get("group_weights")
        return cls(
            method=str(state["method"]), bits=int(state["bits"]), dim=int(state["dim"]),
            num_rows=int(state["num_rows"]), codes=np.asarray(state["codes"], dtype=np.uint8),
            levels=np.asarray(state["levels"]), groups=int(state.get("groups", 1)),
            needs_propagation=bool(state.get("needs_propagation", True)),
            group_weights=None if gw is None else [float(w) for w in gw],
            bias=None if state.get("bias") is None else np.asarray(state["bias"]),
        )


def make_table(
    method: str,
    bits: int,
    codes: torch.Tensor,
    levels: torch.Tensor,
    level_dtype: torch.dtype,
    *,
    groups: int = 1,
    needs_propagation: bool = True,
    group_weights: list[float] | None = None,
    bias: torch.Tensor | None = None,
) -> PackedTable:
    """Build a :class:`PackedTable` from torch codes (R, groups*dim), levels (R or 1, groups, 2**b)
    and optional per-row score biases (R,), both stored in ``level_dtype``."""
    np_dtype = _np_float(level_dtype)
    rows, width = codes.shape
    packed = pack_codes_torch(codes.detach(), bits).cpu().numpy()
    lv = levels.detach().to(torch.float32).cpu().numpy().astype(np_dtype)
    return PackedTable(
        method=method, bits=bits, dim=width // groups, num_rows=rows, codes=packed, levels=lv,
        groups=groups, needs_propagation=needs_propagation, group_weights=group_weights,
        bias=None if bias is None else bias.detach().to(torch.float32).cpu().numpy().astype(np_dtype),
    )


def storage_report(table: PackedTable) -> dict[str, float]:
    """Bytes per node as stored, the fp32 baseline, the ratio, and the b*d/8 + levels (+ bias) floor."""
    report = storage_figures(table.bits, table.dim, table.groups, table.num_rows, table.code_bytes(),
                             table.level_bytes())
    return with_bias_bytes(report, table.bias_bytes() / max(table.num_rows, 1)) if table.bias is not None else report


def with_bias_bytes(report: dict[str, float], per_node: float) -> dict[str, float]:
    """A storage report with ``per_node`` bytes of score bias counted in the total and the floor."""
    out = dict(report, bias_bytes_per_node=per_node)
    for key in ("bytes_per_node", "floor_bytes_per_node"):
        out[key] = report[key] + per_node
    out["compression_ratio"] = out["fp32_bytes_per_node"] / out["bytes_per_node"]
    return out


def storage_figures(bits: int, dim: int, groups: int, num_rows: int, code_bytes: int,
                    level_bytes: int) -> dict[str, float]:
    """:func:`storage_report` from byte counts (e.g. summed over the shards of a table)."""
    n = max(num_rows, 1)
    level_per_node = level_bytes / n
    total = code_bytes + level_bytes
    fp32 = num_rows * dim * 4
    return {
        "bytes_per_node": total / n,
        "code_bytes_per_node": code_bytes / n,
        "level_bytes_per_node": level_per_node,
        "floor_bytes_per_node": bits * dim * groups / 8 + level_per_node,
        "fp32_bytes_per_node": fp32 / n,
        "compression_ratio": fp32 / max(total, 1),
        "bits": float(bits),
        "groups": float(groups),
    }


__all__ = [
    "SUPPORTED_BITS",
    "PackedTable",
    "make_table",
    "pack_codes",
    "pack_codes_torch",
    "packed_row_bytes",
    "storage_figures",
    "storage_report",
    "unpack_codes",
    "with_bias_bytes",
    "unpack_codes_torch",
]
