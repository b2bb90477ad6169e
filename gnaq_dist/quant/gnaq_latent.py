"""``gnaq_lat``: GNAQ trained quantized from the first step, with a low-precision latent.

Why: GNAQ from scratch (no fp warm-up) collapses (docs/notes/2026-12-07-gnaq-from-scratch.md):
re-assigning every node's codes from its propagated embedding makes all nodes' code patterns
alike within an epoch, and with the codes frozen instead a node can learn only its 2^b levels.
GNAQ-STE escapes both by letting a latent table decide the codes, but that latent is an fp32
``(N, d)`` table with Adam's two fp32 tables beside it: what quantized training from scratch
should not hold.

This variant keeps GNAQ's per-node levels and codes and gives each node a **b_lat-bit integer
latent** (``model.latent_bits``: 2, 4 or 8; the variant's 4, two values a byte) in place of the fp32 one:

* forward: ``x_i[d] = phi(c_i[q_i[d]])`` as GNAQ; the codes ``q_i`` are the equal-width bins
  of the latent row ``u_i`` over its ``[min, max]`` (as GNAQ bins its rows), so they are never
  stored apart while training;
* backward: the levels get GNAQ's gather gradient (through the graph, Adam as every
  parameter); ``dL/dx_i`` reaches the latent straight through (as GNAQ-STE), stashed for the
  update below and clipped at 3 (``latent_clip``: the value clip every parameter gets by default);
* the latent update (after each optimizer step, in :meth:`refine`, the trainers' hook for
  code re-assignment): a row-wise Adam without first moment, ``v_i <- b v_i + (1-b) mean_d g_i^2``
  and ``v_hat_i = v_i / (1 - b^t_i)`` with the row's own update count ``t_i`` (two fp32 a node,
  checkpointed with the row), ``u_i <- clamp(SR(u_i - eta (2^b_lat - 1) g_i / (sqrt(v_hat_i) + eps)),
  0, 2^b_lat - 1)``
  with SR stochastic rounding (an update smaller than one step still moves a value with
  probability equal to its size), ``eta`` = ``model.latent_lr`` (a fraction of the latent's
  range a step; the trainers set it: by default ``model.latent_budget`` over the run's quantized
  steps, decayed along a cosine over the run, ``train/schedule.py``). The stashed gradients are applied in the order the backward
  handed them over: the L2 term's (the batch's rows) first, then the propagation's (every row
  the forward read), each an update of its own (its own ``t_i``). The rounding noise is a hash of (seed,
  the row's global id, its update count ``t_i``, the dimension) (:func:`rounding_noise`), so a
  row draws the same noise whichever process holds it: 1 and W ranks round alike, and a run
  resumed from a checkpoint continues the same draws;
* re-binning: a row whose latent spans less than the full integer range is stretched back to
  it (``round((u - min) (2^b_lat - 1) / (max - min))``). Equal-width bins do not change under
  an affine map of the row, so this keeps the codes and restores the latent's resolution.

In the distributed loop (:mod:`gnaq_dist.distributed.sharded`) the owner of a row holds its
latent and ``(v, t)``; ``dL/dx`` of the row reaches it from every rank that used the row and is
applied with :meth:`GNAQLatent.stash` then :meth:`GNAQLatent.refine`, and the other ranks read
the row's codes (:meth:`GNAQLatent.packed_codes_of`) with its levels.

Nothing of size ``(N, d)`` in fp32 lives across steps: the state per node is the latent
(``b_lat d / 8`` bytes as stored), the levels and their Adam moments, and ``v_i, t_i``. The step's
``dL/dx`` is a transient ``(N, d)`` array, as every propagated layer is.

Counted bytes per node (``storage_report`` plus :attr:`latent_bytes_per_node`): the codes and
levels of the packed table, plus the latent a checkpoint needs to go on training (at b_lat =
4, d = 64: 16 + 8 + 32 = 56 B). A model that is done training ships the packed table only.
"""

from __future__ import annotations

import numpy as np
import torch

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.keyed import derive_key, splitmix64
from gnaq_dist.quant.base import init_normal_table
from gnaq_dist.quant.gnaq import GNAQ, equal_width_codes, paper_levels
from gnaq_dist.quant.packing import PackedTable, pack_codes_torch, packed_row_bytes, unpack_codes_torch

UPDATE_ROWS = 8192  # rows the latent update and the code packing handle at once (bounds their temporaries)
_NOISE_PURPOSE = 0x6C6174656E74  # keeps the rounding noise's key apart from the run's other keyed draws

DEFAULT_LATENT_LR = 0.01  # a method built without a run's plan (tests, export); the trainers pass model.latent_lr resolved
LATENT_BITS = (2, 4, 8)  # widths that pack whole into bytes: the latent is held packed


def rounding_noise(key: int | np.uint64, global_ids: torch.Tensor, counts: torch.Tensor, dim: int) -> torch.Tensor:
    """Uniform [0, 1) float32 (n, dim): element (i, d) a hash of (key, ``global_ids[i]``,
    ``counts[i]``, d). Counter-based, so a row's draws do not depend on which process holds it,
    on the other rows updated beside it or on their order."""
    ids = global_ids.to(torch.int64).numpy().astype(np.uint64)
    t = counts.to(torch.int64).numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        row = splitmix64(splitmix64(ids ^ np.uint64(key)) ^ t)
        z = splitmix64(row[:, None] ^ np.arange(dim, dtype=np.uint64)[None, :])
    return torch.from_numpy((z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24)))


class _GradSink(torch.autograd.Function):
    """Identity whose backward hands ``dL/dx`` to the method (the latent's straight-through path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, method: "GNAQLatent", ids: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.method = method
        ctx.ids = ids
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.method._stash(ctx.ids, grad.detach())
        return grad, None, None


class GNAQLatent(GNAQ):
    """GNAQ's levels and codes, the codes driven by a b_lat-bit integer latent; see the module docstring."""

    def __init__(self, num_nodes: int, dim: int, bits: int = 2, num_layers: int = 3, variant: str = "gnaq_lat",
                 phi: str | None = None, latent_bits: int | None = None, latent_lr: float | None = None,
                 latent_beta: float = 0.999, latent_clip: float | None = 3.0, seed: int | None = None) -> None:
        from gnaq_dist.methods import GNAQ_VARIANTS

        spec = GNAQ_VARIANTS.get(variant)
        if spec is None or not spec.latent_bits:
            raise GnaqInputError(f"{variant!r} is not a GNAQ variant with a low-precision latent")
        latent_bits = spec.latent_bits if latent_bits is None else int(latent_bits)
        if latent_bits not in LATENT_BITS:
            raise GnaqInputError(f"latent_bits must be one of {LATENT_BITS}, got {latent_bits}")
        if latent_bits < bits:
            raise GnaqInputError(f"latent_bits ({latent_bits}) must be >= the code width ({bits})")
        latent_lr = DEFAULT_LATENT_LR if latent_lr is None else float(latent_lr)
        if not latent_lr > 0:
            raise GnaqInputError(f"latent_lr must be > 0, got {latent_lr}")
        self.latent_bits = latent_bits
        self.latent_max = (1 << latent_bits) - 1
        self.latent_lr = float(latent_lr)
        self.latent_beta = float(latent_beta)
        self.latent_clip = latent_clip
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        super().__init__(num_nodes, dim, bits, num_layers, variant=variant, phi=phi)
        self.refines = True  # the trainers' post-step hook applies the latent update
        # GNAQ's packed codes are not kept: the codes are the latent's bins (no bytes held for them)
        self.packed_codes = torch.zeros(0, dtype=torch.uint8)
        # the latent, held packed as it is stored (8 / b_lat values a byte; unpacked per use)
        self.register_buffer("latent_packed",
                             torch.zeros(num_nodes, packed_row_bytes(dim, latent_bits), dtype=torch.uint8))
        # per row: the second moment of dL/dx (an EMA of its mean square) and the row's update count
        self.register_buffer("grad_sq", torch.zeros(num_nodes, 2))
        seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.noise_key = int(derive_key(seed, _NOISE_PURPOSE))
        # the global id of each held row (a distributed shard's own rows); None: row i is node i
        self.global_ids: torch.Tensor | None = None
        self.init_from_full_precision(init_normal_table(num_nodes, dim))

    @property
    def latent_bytes_per_node(self) -> float:
        """Bytes a node's latent takes, held and stored packed (b_lat bits a dimension), beside the packed table."""
        return float(self.latent_packed.shape[1])

    def _latent(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The latent rows ``ids`` (None: all) unpacked, uint8 (n, d): a fresh tensor."""
        packed = self.latent_packed if ids is None else self.latent_packed[ids]
        return unpack_codes_torch(packed, self.latent_bits, self.dim)

    def _set_latent(self, ids: torch.Tensor | None, values: torch.Tensor) -> None:
        packed = pack_codes_torch(values.to(torch.uint8), self.latent_bits)
        if ids is None:
            self.latent_packed.copy_(packed)
        else:
            self.latent_packed[ids] = packed

    @property
    def latent_int(self) -> torch.Tensor:
        """All latent values unpacked, uint8 (N, d) (a copy; assign ``latent_int = ...`` to set them)."""
        return self._latent(None)

    @latent_int.setter
    def latent_int(self, values: torch.Tensor) -> None:
        self._set_latent(None, values)

    # -- codes and forward ----------------------------------------------------------------
    @property
    def codes(self) -> torch.Tensor:
        """All codes, uint8 (N, d): the latent's bins (a fresh tensor). Assigning codes sets the
        latent to ``q (2^b_lat - 1) / (2^b - 1)``, whose bins are those codes when each row
        uses codes 0 and 2^b - 1."""
        return self._codes_of(None)

    @codes.setter
    def codes(self, value: torch.Tensor) -> None:
        if "latent_packed" not in self._buffers:  # GNAQ.__init__, before the latent exists
            GNAQ.codes.fset(self, value)
            return
        q = value.to(self.latent_packed.device).to(torch.float32)
        self._set_latent(None, (q * (self.latent_max / (self.num_levels - 1))).round_())

    def _codes_of(self, ids: torch.Tensor | None) -> torch.Tensor:
        if "latent_packed" not in self._buffers:  # during GNAQ.__init__, before the latent exists
            return super()._codes_of(ids)
        return equal_width_codes(self._latent(ids).to(torch.float32), self.num_levels)

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self._ids(ids)
        c = self.levels if ids is None else self.levels[ids]
        x = torch.gather(self.phi(c), 1, self._codes_of(ids).long())
        if torch.is_grad_enabled():
            self._pending = []
            x = _GradSink.apply(x, self, ids)
        return x

    def _stash(self, ids: torch.Tensor | None, grad: torch.Tensor) -> None:
        self._pending.append((ids, grad))

    # -- initialisation, update and re-binning --------------------------------------------
    @torch.no_grad()
    def init_from_full_precision(self, weight: torch.Tensor) -> None:
        """Levels as GNAQ's (the rows' value domain); latent = each row stretched onto 0 .. 2^b_lat - 1."""
        if "latent_packed" not in self._buffers:  # GNAQ.__init__'s own call: the latent comes after
            return super().init_from_full_precision(weight)
        e = self._check_weight(weight)
        self.levels.copy_(paper_levels(e, self.num_levels))
        self._set_latent(None, self._stretch(e))
        self.grad_sq.zero_()
        self._pending = []
        if self.bias is not None:
            self.bias.zero_()

    def _stretch(self, values: torch.Tensor) -> torch.Tensor:
        """Each row mapped affinely onto [0, 2^b_lat - 1], rounded (a constant row: all 0)."""
        lo = values.amin(dim=1, keepdim=True)
        width = values.amax(dim=1, keepdim=True) - lo
        scale = torch.where(width > 0, self.latent_max / width, torch.zeros_like(width))
        return ((values - lo) * scale).round_().clamp_(0, self.latent_max).to(torch.uint8)

    def stash(self, ids: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Hand ``dL/dx`` of rows ``ids`` (None: every held row) to the next :meth:`refine`, as the
        backward of :meth:`embed` does: the distributed owner's path, whose rows are not embedded here."""
        self._pending.append((ids, grad.detach()))

    @torch.no_grad()
    def refine(self, ids: torch.Tensor | None, propagated: torch.Tensor | None) -> None:
        """Apply the step's stashed ``dL/dx`` to the latent, one stashed message after the other
        in the order they came (row-wise normalised, stochastic rounding), then re-bin the rows
        whose latent no longer spans the full range. ``ids`` and ``propagated`` are not used:
        this variant's codes follow its latent, not the propagated rows."""
        pending, self._pending = self._pending, []
        for rows, g in pending:
            self._update(rows, g.to(torch.float32))
        return None

    def _update(self, rows: torch.Tensor | None, g: torch.Tensor) -> None:
        """One update of rows ``rows`` (None: all) from their gradient ``g`` (spent in place)."""
        b = self.latent_beta
        if self.latent_clip is not None:
            g = g.clamp_(-self.latent_clip, self.latent_clip)
        state = self.grad_sq if rows is None else self.grad_sq[rows]  # (n, 2): v and the row's step count
        t = state[:, 1:] + 1
        v = b * state[:, :1] + (1 - b) * (torch.einsum("nd,nd->n", g, g) / self.dim).unsqueeze(1)
        new_state = torch.cat([v, t], dim=1)
        if rows is None:
            self.grad_sq.copy_(new_state)
        else:
            self.grad_sq[rows] = new_state
        v_hat = v / (1 - b**t)
        step = g.mul_(self.latent_lr * self.latent_max / (v_hat.sqrt() + 1e-8))
        local = torch.arange(self.num_nodes) if rows is None else rows
        gids = local if self.global_ids is None else self.global_ids[local]
        # a piece of rows at a time: the update's float and hash temporaries stay a piece's size
        for lo in range(0, int(local.shape[0]), UPDATE_ROWS):
            sl = slice(lo, lo + UPDATE_ROWS)
            piece = local[sl]
            u = self._latent(piece).to(torch.float32)
            noise = rounding_noise(self.noise_key, gids[sl], t[sl, 0], self.dim)
            new = u.sub_(step[sl]).add_(noise).floor_().clamp_(0, self.latent_max)
            self._set_latent(piece, self._rebin(new))

    def packed_codes_of(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The codes of rows ``ids`` (None: all), packed as a PackedTable stores them: what the
        distributed loop serves for the rows (uint8 (n, ceil(d b / 8))), a piece of rows at a time."""
        ids = torch.arange(self.num_nodes) if ids is None else ids
        out = torch.empty((int(ids.shape[0]), packed_row_bytes(self.dim, self.bits)), dtype=torch.uint8)
        for lo in range(0, int(ids.shape[0]), UPDATE_ROWS):
            out[lo: lo + UPDATE_ROWS] = pack_codes_torch(self._codes_of(ids[lo: lo + UPDATE_ROWS]), self.bits)
        return out

    def _rebin(self, u: torch.Tensor) -> torch.Tensor:
        """Rows spanning less than the full range stretched back onto it (codes unchanged)."""
        lo = u.amin(dim=1, keepdim=True)
        hi = u.amax(dim=1, keepdim=True)
        narrow = ((hi - lo) < self.latent_max) & (hi > lo)
        if not bool(narrow.any()):
            return u
        return torch.where(narrow, self._stretch(u).to(u.dtype), u)

    # -- state ---------------------------------------------------------------------------
    def code_state(self) -> torch.Tensor | None:
        return self._codes_of(None)

    def codes_changed(self, before: torch.Tensor) -> tuple[int, int]:
        now = self._codes_of(None)
        return int((before != now).sum()), int(now.numel())

    @torch.no_grad()
    def layer0_error(self, level_dtype: torch.dtype = torch.float16) -> tuple[float, float]:
        """As GNAQ's (there is no fp table): the rows with fp32 levels against fp16-stored levels."""
        x = self.embed(None)
        stored = self.phi(self.levels.detach()).to(level_dtype).to(torch.float32)
        q = torch.gather(stored, 1, self._codes_of(None).long())
        return float((x - q).abs().sum()), float(x.abs().sum())

    @torch.no_grad()
    def load_packed(self, table: PackedTable) -> None:
        """Levels (phi^-1 of the stored values) and codes from a packed table; the latent is rebuilt
        from the codes (``q (2^b_lat - 1) / (2^b - 1)``: its bins are exactly the stored codes when
        each row uses codes 0 and 2^b - 1), not the trained latent: resume training from a
        checkpoint, not from a packed table."""
        self._check_table(table)
        dev = self.levels.device
        q = torch.from_numpy(table.unpacked_codes()).to(dev).to(torch.float32)
        values = torch.from_numpy(table.levels.astype("float32")).to(dev)[:, 0, :]
        self.levels.copy_(self.phi_inv(values.expand(self.num_nodes, self.num_levels),
                                       clip=1.0 - torch.finfo(torch.float32).eps))
        if self.bias is not None:
            if table.bias is None:
                raise GnaqInputError(f"{self.name}: the packed table has no score biases")
            self.bias.copy_(torch.from_numpy(table.bias.astype("float32")).to(dev))
        self.codes = q
        self.grad_sq.zero_()
        self._pending = []

    def trainable_row_params(self) -> list[torch.nn.Parameter]:
        return [self.levels] + ([self.bias] if self.bias is not None else [])

    def row_buffers(self) -> list[torch.Tensor]:
        return [self.latent_packed, self.grad_sq]


__all__ = ["DEFAULT_LATENT_LR", "GNAQLatent", "LATENT_BITS"]
