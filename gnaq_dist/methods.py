"""The embedding methods' names and the GNAQ variants' settings: the one registry.

Why a module of its own, without torch: the config (``train/config.py``) validates method
names before any training stack is imported, and the methods (``quant/``) build from the
same table, so a variant is registered once.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANT_BITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class GnaqVariant:
    """What distinguishes one GNAQ variant from another (all share the per-node levels and codes).

    ``phi``: the level activation; ``refine_every``: optimizer steps between code
    re-assignments from the propagated embeddings (0 = never); ``score_bias``: per-user and
    per-item biases in the score; ``l2``: whether ``optim.l2`` applies to the layer-0 rows;
    ``straight_through``: codes follow a latent fp table (the STE ablation);
    ``latent_bits``: > 0 for a variant whose codes follow a low-precision integer latent of
    that many bits a dimension, updated after every optimizer step (``gnaq_lat``,
    ``quant/gnaq_latent.py``); 0 for none.
    """

    phi: str
    refine_every: int
    score_bias: bool
    l2: bool
    straight_through: bool = False
    latent_bits: int = 0


#: ``gnaq`` is the authors' reference code; ``gnaq_static`` the frozen-code form this project
#: trained before (codes fixed at the quantized start, identity levels, no biases, L2);
#: ``gnaq_ste`` the straight-through ablation; ``gnaq_lat`` GNAQ trained from scratch with a
#: 4-bit integer latent driving the codes (no fp32 table or Adam state of size (N, d)).
GNAQ_VARIANTS: dict[str, GnaqVariant] = {
    "gnaq": GnaqVariant(phi="tanh", refine_every=1, score_bias=True, l2=False),
    "gnaq_static": GnaqVariant(phi="identity", refine_every=0, score_bias=False, l2=True),
    "gnaq_ste": GnaqVariant(phi="identity", refine_every=0, score_bias=False, l2=True, straight_through=True),
    "gnaq_lat": GnaqVariant(phi="identity", refine_every=1, score_bias=False, l2=True, latent_bits=4),
}

METHODS = ("fp", *GNAQ_VARIANTS, "lsq", "n2uq", "bigear")


def is_gnaq(name: str) -> bool:
    """A GNAQ variant (per-node levels and codes)."""
    return name in GNAQ_VARIANTS


def is_packed_gnaq(name: str) -> bool:
    """A GNAQ variant whose codes are state (not re-derived from a latent): it travels packed and refines."""
    spec = GNAQ_VARIANTS.get(name)
    return spec is not None and not spec.straight_through and not spec.latent_bits


def is_latent_gnaq(name: str) -> bool:
    """A GNAQ variant whose codes follow a low-precision integer latent (``gnaq_lat``): it takes
    ``model.latent_bits`` and ``model.latent_lr``."""
    spec = GNAQ_VARIANTS.get(name)
    return spec is not None and bool(spec.latent_bits)


__all__ = ["GNAQ_VARIANTS", "GnaqVariant", "METHODS", "QUANT_BITS", "is_gnaq", "is_latent_gnaq", "is_packed_gnaq"]
