"""Byte accounting: what a rank sends to other ranks, by kind, beside its fp32 equivalent.

Why apart from the collectives: every exchange counts into a :class:`WireCounter` the
caller passes (or None), and the trainer sums the counters over ranks
(:mod:`.metrics`); the counter itself knows nothing of the process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gnaq_dist.errors import GnaqInputError

#: ``activations``: fp32 rows of propagated layers and their gradients (full-graph propagation
#: split by owner, :mod:`.halo`), kept apart from the embedding rows and their gradients.
WIRE_KINDS = ("rows_fetched", "gradients_sent", "activations", "allreduce", "control")


@dataclass
class WireCounter:
    """Bytes this rank sent to other ranks, by kind, with their fp32 equivalents.

    ``control`` is headers and row ids: the same whatever the row format, so it is kept
    apart from the payload kinds (their ratios compare like with like) and added back in
    :meth:`total`. Bytes a rank sends to itself are not counted: they never leave it.
    """

    sent: dict[str, int] = field(default_factory=lambda: {k: 0 for k in WIRE_KINDS})
    fp32: dict[str, int] = field(default_factory=lambda: {k: 0 for k in WIRE_KINDS})
    messages: dict[str, int] = field(default_factory=lambda: {k: 0 for k in WIRE_KINDS})

    def add(self, kind: str, nbytes: int, fp32_bytes: int | None = None) -> None:
        if kind not in WIRE_KINDS:
            raise GnaqInputError(f"wire kind must be one of {WIRE_KINDS}, got {kind!r}")
        self.sent[kind] += int(nbytes)
        self.fp32[kind] += int(nbytes if fp32_bytes is None else fp32_bytes)
        self.messages[kind] += 1

    def total(self) -> int:
        return sum(self.sent.values())

    def total_fp32(self) -> int:
        return sum(self.fp32.values())

    def ratio(self, kind: str | None = None) -> float:
        """fp32-equivalent bytes over bytes sent (for ``kind``, or all kinds); inf if nothing sent."""
        sent = self.total() if kind is None else self.sent[kind]
        fp32 = self.total_fp32() if kind is None else self.fp32[kind]
        return float("inf") if sent == 0 else fp32 / sent

    def summary(self) -> dict[str, float]:
        """Flat dict for a training log: ``<kind>_bytes``, ``<kind>_fp32_bytes``, totals, ratio."""
        out: dict[str, float] = {}
        for k in WIRE_KINDS:
            out[f"{k}_bytes"] = self.sent[k]
            out[f"{k}_fp32_bytes"] = self.fp32[k]
        out["total_bytes"] = self.total()
        out["total_fp32_bytes"] = self.total_fp32()
        out["total_ratio"] = self.ratio()
        return out

    def reset(self) -> None:
        for k in WIRE_KINDS:
            self.sent[k] = self.fp32[k] = self.messages[k] = 0

    def pop(self) -> dict[str, float]:
        """:meth:`summary`, then :meth:`reset` (call once per step)."""
        out = self.summary()
        self.reset()
        return out


def count_bytes(counter: WireCounter | None, kind: str, nbytes: int, fp32_bytes: int | None = None) -> None:
    """``counter.add(...)``, where the caller may pass no counter."""
    if counter is not None:
        counter.add(kind, nbytes, fp32_bytes)


__all__ = ["WIRE_KINDS", "WireCounter", "count_bytes"]
