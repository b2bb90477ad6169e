"""GNAQ: node-aware dynamic quantization (per-node codebooks, codes refined from the graph).

Every node i has 2^b learnable levels ``c_i`` and b-bit codes ``q_i``; its layer-0
embedding is ``x_i[d] = phi(c_i[q_i[d]])``. The codes are held packed, ``8 / b`` to a
byte (``packed_codes``, the storage and wire layout), and unpacked only for the rows a
forward touches: at b = 2 a row's codes cost d/4 bytes in memory instead of d. The codes are never
differentiated. The *graph relation-aware gradient* needs no custom backward: the
caller propagates ``x`` over the graph, so ``dL/dx_i`` already sums the multi-hop
neighbours' gradients, and autograd through the gather and ``phi`` gives exactly
``dL/dc_i[k] = sum_{d: q_i[d]=k} phi'(c_i[k]) g_i[d]``.

The variants (:data:`gnaq_dist.methods.GNAQ_VARIANTS`) share this class:

* ``gnaq``, the authors' reference code: levels initialised in the value domain of the
  warm-up table (``m + (k+1)(M-m)/(2^b+1)``, codes = equal-width bins of ``[m, M]``) and
  ``tanh`` applied to them in the forward; the trainers re-assign every node's codes from
  its propagated embedding every step (:meth:`refine`); a per-node score bias
  (:meth:`bias_of`; the score is ``<h_u, h_i> + b_u + b_i``); no L2.
* ``gnaq_static``: the same levels and codes, ``phi`` the identity, codes fixed after the
  quantized start, no bias, L2.
* ``gnaq_ste`` (``straight_through=True``), the ablation: a latent fp table ``w`` decides the
  codes at every forward (equal-width bins of each row of ``w``), the forward value is still
  ``phi(c[q])``, and the backward passes ``dL/dx`` to ``w`` unchanged (the levels also get
  their gather gradient). ``refine`` is a no-op there: codes follow ``w``.

Decisions where the reference is silent: a row with ``max == min`` gets code 0 everywhere
and all levels equal to that value (no division by zero, no NaN); levels are computed as
``phi(c)`` first and then gathered, so the training-time table equals the packed table's
dequantization bit for bit with float32 levels; the biases start at zero (the reference's
``torchfm`` linear term starts at N(0, 1)).
"""

from __future__ import annotations

import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.methods import GNAQ_VARIANTS
from gnaq_dist.quant.base import EmbeddingMethod, init_normal_table
from gnaq_dist.quant.packing import PackedTable, make_table, pack_codes_torch, packed_row_bytes, unpack_codes_torch

PHIS = ("tanh", "identity")
_INIT_CLIP = 0.999  # atanh(0.999) = 3.8: a stored level of +-1 restores to a finite pre-activation


def equal_width_codes(values: torch.Tensor, num_levels: int) -> torch.Tensor:
    """uint8 index of the equal-width bin of each row's [min, max] (num_levels bins) holding each value.

    Computed as ``floor((v - min) * (k / (max - min)))`` clamped to [0, k-1]: one fused
    pass over the (n, d) values; a row with max == min gets code 0 everywhere.
    """
    lo = values.amin(dim=1, keepdim=True)
    width = values.amax(dim=1, keepdim=True) - lo
    inv = torch.where(width > 0, num_levels / width, torch.zeros_like(width))
    return (values - lo).mul_(inv).floor_().clamp_(0, num_levels - 1).to(torch.uint8)


def paper_levels(values: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Levels evenly spaced inside each row's (min, max): m + (k+1)(M-m)/(2^b+1)."""
    lo = values.amin(dim=1, keepdim=True)
    hi = values.amax(dim=1, keepdim=True)
    steps = torch.arange(1, num_levels + 1, dtype=values.dtype, device=values.device)
    return lo + steps * (hi - lo) / (num_levels + 1)


class GNAQ(EmbeddingMethod):
    """Per-node learnable levels (N, 2^b) + packed b-bit codes (N, d·b/8); see the module docstring."""

    name = "gnaq"

    def __init__(
        self,
        num_nodes: int,
        dim: int,
        bits: int = 2,
        num_layers: int = 3,
        variant: str = "gnaq",
        phi: str | None = None,
    ) -> None:
        super().__init__(num_nodes, dim, num_layers)
        if variant not in GNAQ_VARIANTS:
            raise GnaqInputError(f"unknown GNAQ variant {variant!r} (known: {', '.join(GNAQ_VARIANTS)})")
        spec = GNAQ_VARIANTS[variant]
        phi = spec.phi if phi is None else phi
        if phi not in PHIS:
            raise GnaqInputError(f"phi must be one of {PHIS}, got {phi!r}")
        self.name = variant
        self.bits = int(bits)
        self.num_levels = 1 << self.bits
        self.phi_name = phi
        self.straight_through = spec.straight_through
        self.uses_l2 = spec.l2
        self.refines = not spec.straight_through
        self.levels = torch.nn.Parameter(torch.zeros(num_nodes, self.num_levels))
        self.register_buffer("packed_codes",
                             torch.zeros(num_nodes, packed_row_bytes(dim, self.bits), dtype=torch.uint8))
        self.latent: torch.nn.Parameter | None = None
        if self.straight_through:
            self.latent = torch.nn.Parameter(torch.zeros(num_nodes, dim))
        self.bias: torch.nn.Parameter | None = None
        if spec.score_bias:
            self.bias = torch.nn.Parameter(torch.zeros(num_nodes))
        # Usable before a warm-up: quantize LightGCN's N(0, 0.1^2) start.
        self.init_from_full_precision(init_normal_table(num_nodes, dim))

    # -- phi ---------------------------------------------------------------------------
    def phi(self, c: torch.Tensor) -> torch.Tensor:
        return torch.tanh(c) if self.phi_name == "tanh" else c

    def phi_inv(self, x: torch.Tensor, clip: float = _INIT_CLIP) -> torch.Tensor:
        """Pre-activation of a stored (activated) level, clipped where tanh cannot reach it."""
        if self.phi_name == "tanh":
            return torch.atanh(x.clamp(-clip, clip))
        return x

    # -- codes -------------------------------------------------------------------------
    @property
    def codes(self) -> torch.Tensor:
        """All codes unpacked, uint8 (N, d): a fresh tensor (assign ``codes = ...`` to set them)."""
        return unpack_codes_torch(self.packed_codes, self.bits, self.dim)

    @codes.setter
    def codes(self, value: torch.Tensor) -> None:
        self.packed_codes.copy_(pack_codes_torch(value.to(self.packed_codes.device), self.bits))

    # -- forward -----------------------------------------------------------------------
    def _codes_of(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Codes of the rows (GNAQ: unpacked from the buffer; STE: re-derived from the latent table)."""
        if self.latent is None:
            packed = self.packed_codes if ids is None else self.packed_codes[ids]
            return unpack_codes_torch(packed, self.bits, self.dim)
        w = self.latent.detach() if ids is None else self.latent.detach()[ids]
        return equal_width_codes(w, self.num_levels)

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids(ids)
        c = self.levels if ids is None else self.levels[ids]
        q = self._codes_of(ids).long()
        x = torch.gather(self.phi(c), 1, q)
        if self.latent is not None:
            w = self.latent if ids is None else self.latent[ids]
            x = x + (w - w.detach())  # forward value unchanged, dL/dx reaches w as is
        return x

    def bias_of(self, ids: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.bias is None:
            return None
        ids = self._ids(ids)
        return self.bias if ids is None else self.bias[ids]

    # -- initialisation and refinement ------------------------------------------------
    @torch.no_grad()
    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        """Levels and codes from the warm-up rows in their value domain (the reference's), whatever phi."""
        e = self._check_weight(weight)
        self.levels.copy_(paper_levels(e, self.num_levels))
        self.codes = equal_width_codes(e, self.num_levels)
        if self.latent is not None:
            self.latent.copy_(e)
        if self.bias is not None:
            self.bias.zero_()

    @torch.no_grad()
    def refine(self, ids: torch.Tensor | None, propagated: torch.Tensor) -> None:
        """q_ids <- equal-width bins of the propagated h over each row's [min, max] (``ids`` None:
        every row, ``propagated`` then (N, d)); a no-op for GNAQ-STE."""
        if self.latent is not None:
            return None
        n = self.num_nodes if ids is None else None
        if ids is not None:
            ids = self._ids(ids)
            n = ids.shape[0]
        if propagated.dim() != 2 or tuple(propagated.shape) != (n, self.dim):
            raise GnaqInputError(f"refine needs propagated embeddings ({n}, {self.dim}), got {tuple(propagated.shape)}")
        h = propagated.detach().to(device=self.packed_codes.device, dtype=torch.float32)
        packed = pack_codes_torch(equal_width_codes(h, self.num_levels), self.bits)
        if ids is None:
            self.packed_codes.copy_(packed)
        else:
            self.packed_codes[ids] = packed
        return None

    def code_state(self) -> torch.Tensor | None:
        return self.packed_codes.detach().clone() if self.latent is None else self._codes_of(None)

    def codes_changed(self, before: torch.Tensor) -> tuple[int, int]:
        now = self.code_state()
        if self.latent is None:
            before = unpack_codes_torch(before, self.bits, self.dim)
            now = unpack_codes_torch(now, self.bits, self.dim)
        return int((before != now).sum()), int(now.numel())

    @torch.no_grad()
    def layer0_error(self, level_dtype: torch.dtype = torch.float16) -> tuple[float, float]:
        """STE: x = the latent, Q(x) = the layer-0 rows. GNAQ (no fp table): x = the layer-0 rows
        with fp32 levels as trained, Q(x) = the same rows with levels in ``level_dtype`` as stored."""
        q = self.embed(None).detach()
        if self.latent is not None:
            x = self.latent.detach()
        else:
            x = q
            stored = self.phi(self.levels.detach()).to(level_dtype).to(torch.float32)
            q = torch.gather(stored, 1, self._codes_of(None).long())
        return float((x - q).abs().sum()), float(x.abs().sum())

    # -- storage ------------------------------------------------------------------------
    @torch.no_grad()
    def pack(self, level_dtype: torch.dtype = torch.float16) -> PackedTable:
        codes = self._codes_of(None)
        return make_table(self.name, self.bits, codes, self.phi(self.levels).unsqueeze(1), level_dtype,
                          bias=self.bias)

    @torch.no_grad()
    def load_packed(self, table: PackedTable) -> None:
        """Restore levels (phi^-1 of the stored values), codes and score biases.

        GNAQ-STE has no latent table in storage; ``w`` is rebuilt as ``-1 + 2q/(k-1)``,
        which re-derives exactly the stored codes whenever each row uses codes 0 and
        2^b-1 (every table GNAQ-STE packs does), but is not the trained latent: resume
        training from a state_dict, not from a packed table.
        """
        self._check_table(table)
        dev = self.levels.device
        codes = torch.from_numpy(table.unpacked_codes()).to(dev)
        values = torch.from_numpy(table.levels.astype("float32")).to(dev)[:, 0, :]
        values = values.expand(self.num_nodes, self.num_levels)
        eps = torch.finfo(torch.float32).eps
        self.levels.copy_(self.phi_inv(values, clip=1.0 - eps))
        self.codes = codes
        if self.bias is not None:
            if table.bias is None:
                raise GnaqInputError(f"{self.name}: the packed table has no score biases")
            self.bias.copy_(torch.from_numpy(table.bias.astype("float32")).to(dev))
        if self.latent is not None:
            u = -1.0 + 2.0 * codes.to(torch.float32) / (self.num_levels - 1)
            self.latent.copy_(u)

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        """Levels first (GNAQ's wire rows carry them), the latent (STE) and the score bias after."""
        params = [self.levels] if self.latent is None else [self.latent, self.levels]
        return params + ([self.bias] if self.bias is not None else [])

    def row_buffers(self) -> list[torch.Tensor]:
        return [self.packed_codes]


__all__ = ["GNAQ", "PHIS", "equal_width_codes", "paper_levels"]
