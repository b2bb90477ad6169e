"""Embedding methods: full precision, GNAQ (its variants: see ``gnaq_dist.methods``), LSQ, N2UQ, BiGeaR.

``build_method`` is the one entry point the trainers use; it validates the method name,
the bit width and the options, so a bad config fails before any training starts. Internal
(the methods are chosen by the config's ``model.method``); never imports Ray,
``torch.distributed`` or ``gnaq_dist.distributed`` (docs/architecture.md, "The walls").

Modules:

* :mod:`.base`: ``EmbeddingMethod``, the interface every method offers the training loop;
* :mod:`.full`: full-precision embeddings, the warm-up model and the fp baseline;
* :mod:`.gnaq`: GNAQ, node-aware dynamic quantization (per-node codebooks, codes refined from the graph);
* :mod:`.gnaq_latent`: ``gnaq_lat``, GNAQ trained quantized from the first step, its codes driven by a packed integer latent;
* :mod:`.lsq`: the LSQ baseline, a uniform grid with a learned step size;
* :mod:`.n2uq`: the N2UQ baseline, non-uniform input thresholds and uniform output levels;
* :mod:`.bigear`: the BiGeaR baseline, 1-bit scoring of every layer with distillation;
* :mod:`.packing`: the storage form of a quantized table, bit-packed codes plus levels (``PackedTable``);
* :mod:`.dequant_kernels`: packed rows -> float rows and back to level gradients, one pass each (numba);
* :mod:`.drift`: per-epoch quantization figures: the share of codes changed, the layer-0 error.
"""

from __future__ import annotations

from typing import Any

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.methods import GNAQ_VARIANTS, METHODS, QUANT_BITS
from gnaq_dist.quant.base import EmbeddingMethod
from gnaq_dist.quant.bigear import BiGeaR
from gnaq_dist.quant.full import FullPrecision
from gnaq_dist.quant.gnaq import GNAQ
from gnaq_dist.quant.gnaq_latent import GNAQLatent
from gnaq_dist.quant.lsq import LSQ
from gnaq_dist.quant.n2uq import N2UQ
from gnaq_dist.quant.packing import PackedTable, storage_report


#: Options each method uses. Any known option is accepted by every method (and ignored
#: where it does not apply) so that a trainer can pass its whole model config; an
#: unknown option name is an error.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "fp": (),
    **{name: ("phi",) + (("latent_bits", "latent_lr", "seed") if spec.latent_bits else ())
       for name, spec in GNAQ_VARIANTS.items()},
    "lsq": ("per_row",),
    "n2uq": (),
    "bigear": ("gaussian_a", "graph", "top_r"),
}
_KNOWN_OPTIONS = frozenset(o for opts in _OPTIONS.values() for o in opts)


def build_method(
    name: str, num_nodes: int, dim: int, bits: int | None, num_layers: int, **options: Any
) -> EmbeddingMethod:
    """A fresh method; raises GnaqInputError for an unknown method, bit width or option."""
    if name not in METHODS:
        raise GnaqInputError(f"unknown embedding method {name!r} (known: {', '.join(METHODS)})")
    unknown = sorted(set(options) - _KNOWN_OPTIONS)
    if unknown:
        raise GnaqInputError(f"unknown option(s) for build_method: {', '.join(unknown)}")
    if name == "fp":
        if bits not in (None, 32):
            raise GnaqInputError(f"fp takes no bit width (None or 32), got {bits}")
    elif name == "bigear":
        if bits not in (None, 1):
            raise GnaqInputError(f"bigear is 1-bit only, got {bits}")
    elif bits not in QUANT_BITS:
        raise GnaqInputError(f"{name}: {bits!r} is not a supported bit width (1, 2, 4, 8)")
    opts = {k: v for k, v in options.items() if k in _OPTIONS[name]}
    if name == "fp":
        return FullPrecision(num_nodes, dim, num_layers)
    if name in GNAQ_VARIANTS and GNAQ_VARIANTS[name].latent_bits:
        return GNAQLatent(num_nodes, dim, bits, num_layers, variant=name, **opts)
    if name in GNAQ_VARIANTS:
        return GNAQ(num_nodes, dim, bits, num_layers, variant=name, **opts)
    if name == "lsq":
        return LSQ(num_nodes, dim, bits, num_layers, **opts)
    if name == "n2uq":
        return N2UQ(num_nodes, dim, bits, num_layers)
    return BiGeaR(num_nodes, dim, num_layers, **opts)


__all__ = [
    "BiGeaR",
    "EmbeddingMethod",
    "FullPrecision",
    "GNAQ",
    "GNAQLatent",
    "LSQ",
    "METHODS",
    "N2UQ",
    "PackedTable",
    "QUANT_BITS",
    "build_method",
    "storage_report",
]
