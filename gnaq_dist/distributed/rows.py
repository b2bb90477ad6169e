"""Row servers: a rank's shard of a table, served as fixed-size wire rows and decoded back.

What travels for a row depends on the table: packed codes and levels (:class:`QuantizedShard`,
the quantized methods' storage form), fp32 rows (:class:`DenseShard`, an activation or the
warm-up), or a method's trainable row parameters side by side (:class:`LatentShard`). The
exchanges (:mod:`.row_exchange`, :mod:`.halo_exchange`) move any of them alike.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from gnaq_dist.distributed.compression import bytes_view
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.dequant_kernels import dequantize_rows
from gnaq_dist.quant.packing import PackedTable, packed_row_bytes, unpack_codes_torch


class RowServer(Protocol):
    """What an exchange (:func:`.row_exchange.fetch_rows`, :class:`.halo_exchange.FixedExchange`)
    needs from a rank's shard: fixed-size rows in and out."""

    row_bytes: int  # wire bytes of one served row
    width: int  # values per decoded row
    fp32_row_bytes: int  # what the row would cost as fp32 (for the counter)

    def serve(self, local_rows: torch.Tensor) -> torch.Tensor: ...  # uint8 (n, row_bytes)

    def decode(self, payload: torch.Tensor) -> torch.Tensor: ...  # (n, width) float32


class QuantizedShard:
    """A rank's rows in PackedTable form: packed codes + per-row levels, served as is.

    Row on the wire: ``ceil(groups*dim*b/8)`` code bytes, then ``groups * 2^b`` levels in
    the table's level dtype (fp16: 2 bytes each). With a per-tensor codebook (levels of
    first axis 1) only codes travel; every rank holds the shared levels. 2-bit GNAQ,
    d = 64, fp16 levels: 16 + 8 = 24 bytes a row against 256 in fp32 (10.7x).
    """

    def __init__(self, codes: torch.Tensor, levels: torch.Tensor, bits: int, dim: int, groups: int = 1) -> None:
        self.bits, self.dim, self.groups = int(bits), int(dim), int(groups)
        self.width = self.groups * self.dim
        self.code_bytes = packed_row_bytes(self.width, self.bits)
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != self.code_bytes:
            raise GnaqInputError(f"codes must be uint8 (n, {self.code_bytes}), got {codes.dtype} {tuple(codes.shape)}")
        k = 1 << self.bits
        if levels.dim() != 3 or levels.shape[1:] != (self.groups, k) or levels.shape[0] not in (1, codes.shape[0]):
            raise GnaqInputError(f"levels must be (n or 1, {self.groups}, {k}), got {tuple(levels.shape)}")
        if levels.dtype not in (torch.float16, torch.float32):
            raise GnaqInputError(f"levels must be float16 or float32, got {levels.dtype}")
        self.codes = codes.contiguous()
        self.levels = levels.contiguous()
        self.shared_levels = levels.shape[0] == 1 and codes.shape[0] != 1
        self.level_bytes = 0 if self.shared_levels else self.groups * k * levels.element_size()
        self.row_bytes = self.code_bytes + self.level_bytes
        self.fp32_row_bytes = 4 * self.dim  # the fp32 embedding a row stands for (PackedTable.fp32_bytes)

    @classmethod
    def from_packed(cls, table: PackedTable, rows: np.ndarray | None = None) -> QuantizedShard:
        """The shard of ``table`` holding ``rows`` (e.g. ``partition.owned_ids(rank)``), or all of it."""
        codes, levels = table.codes, table.levels
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            codes = codes[rows]
            levels = levels if levels.shape[0] == 1 else levels[rows]
        return cls(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(levels)),
                   table.bits, table.dim, table.groups)

    @property
    def num_rows(self) -> int:
        return int(self.codes.shape[0])

    def serve(self, local_rows: torch.Tensor) -> torch.Tensor:
        local_rows = local_rows.to(torch.int64)
        if local_rows.numel() and (int(local_rows.min()) < 0 or int(local_rows.max()) >= self.num_rows):
            raise GnaqInputError(f"local rows must lie in [0, {self.num_rows}), got "
                                 f"[{int(local_rows.min())}, {int(local_rows.max())}]")
        codes = self.codes[local_rows]
        if self.shared_levels:
            return codes
        lv = self.levels[local_rows].reshape(local_rows.shape[0], self.level_bytes // self.levels.element_size())
        lv = lv.view(torch.uint8)
        return torch.cat([codes, lv], dim=1)

    def split_payload(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Wire rows -> (packed codes uint8 (n, code bytes), a view of ``payload``; levels float32
        (n, groups, 2^b), or (1, groups, 2^b) for a shared codebook)."""
        n = payload.shape[0]
        packed = payload[:, : self.code_bytes]
        if self.shared_levels:
            return packed, self.levels.to(torch.float32)
        levels = (bytes_view(payload[:, self.code_bytes:], self.levels.dtype)
                  .reshape(n, self.groups, 1 << self.bits).to(torch.float32))
        return packed, levels

    def decode_parts(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Wire rows -> (codes uint8 (n, groups*dim), levels float32 (n, groups, 2^b)), unpacked."""
        packed, levels = self.split_payload(payload)
        codes = unpack_codes_torch(packed.contiguous(), self.bits, self.width)
        return codes, levels.expand(payload.shape[0], -1, -1)

    def decode(self, payload: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Wire rows -> dequantized (n, groups*dim) float32, as :meth:`PackedTable.dequantize`, in
        one pass over the packed bytes (:func:`~gnaq_dist.quant.dequant_kernels.dequantize_rows`);
        into ``out`` if given."""
        packed, levels = self.split_payload(payload)
        levels = levels.reshape(levels.shape[0], self.groups << self.bits)
        return dequantize_rows(packed, levels, self.bits, self.width, self.dim, out=out)


class DenseShard:
    """A rank's rows as a float32 table (the full-precision warm-up): 4*d bytes a row."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise GnaqInputError(f"weight must be 2-D (n, d), got shape {tuple(weight.shape)}")
        self.weight = weight
        self.width = int(weight.shape[1])
        self.row_bytes = self.fp32_row_bytes = 4 * self.width

    def serve(self, local_rows: torch.Tensor) -> torch.Tensor:
        rows = self.weight.detach()[local_rows.to(torch.int64)].to(torch.float32).contiguous()
        return rows.view(torch.uint8).reshape(rows.shape[0], self.row_bytes)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        return bytes_view(payload, torch.float32).reshape(payload.shape[0], self.width)


class LatentShard:
    """RowServer of fp32 row parameters, concatenated per row (``4 * width`` bytes)."""

    def __init__(self, params: list[torch.Tensor], dim: int) -> None:
        self.params = params
        self.widths = [int(p.reshape(p.shape[0], -1).shape[1]) for p in params]
        self.width = sum(self.widths)
        self.row_bytes = 4 * self.width
        self.fp32_row_bytes = 4 * self.width  # what travels is already fp32
        self.dim = dim

    def serve(self, local_rows: torch.Tensor) -> torch.Tensor:
        rows = local_rows.to(torch.int64)
        parts = [p.detach()[rows].reshape(rows.shape[0], w).to(torch.float32) for p, w in zip(self.params, self.widths)]
        out = torch.cat(parts, dim=1).contiguous() if parts else torch.empty(rows.shape[0], 0)
        return out.view(torch.uint8).reshape(rows.shape[0], self.row_bytes)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        return bytes_view(payload, torch.float32).reshape(payload.shape[0], self.width)

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(values, self.widths, dim=1))


__all__ = ["DenseShard", "LatentShard", "QuantizedShard", "RowServer"]
