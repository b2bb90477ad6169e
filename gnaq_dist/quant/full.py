"""Full-precision LightGCN embeddings: the warm-up model and the fp baseline."""

from __future__ import annotations

import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.base import EmbeddingMethod, init_normal_table
from gnaq_dist.quant.packing import PackedTable


class FullPrecision(EmbeddingMethod):
    """An (N, d) float32 parameter, N(0, 0.1^2) from the global torch seed.

    It has no packed form (``pack`` raises): an fp table is saved as its weight.
    """

    name = "fp"
    bits = None

    def __init__(self, num_nodes: int, dim: int, num_layers: int = 3, std: float = 0.1) -> None:
        super().__init__(num_nodes, dim, num_layers)
        self.weight = torch.nn.Parameter(init_normal_table(num_nodes, dim, std))

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids(ids)
        return self.weight if ids is None else self.weight[ids]

    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(self._check_weight(weight))

    def pack(self, level_dtype: torch.dtype = torch.float16) -> PackedTable:
        raise GnaqInputError("the fp method has no packed form: save its weight instead")

    def load_packed(self, table: PackedTable) -> None:
        raise GnaqInputError("the fp method has no packed form: load its weight instead")

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        return [self.weight]
