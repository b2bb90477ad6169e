"""A run's wire and throughput figures: byte counters summed over ranks, steady step rate.

Why apart from the trainer: what a rank counts (:class:`~.wire.WireCounter`) is its own;
the figures a run reports are every rank's, summed by one all_reduce at each epoch's end
and after each whole-table gather, so every rank returns the same summary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gnaq_dist.distributed.comm import allreduce_sum
from gnaq_dist.distributed.wire import WIRE_KINDS, WireCounter


class RunWire:
    """This rank's byte counters since the last sum, and the run's totals over all ranks.

    ``train``: the steps' exchanges (fetch, gradients, all-reduce); ``refine``: propagated
    rows sent to their owners for refinement; ``gather``: whole-table gathers (evaluation,
    the quantized start). :meth:`allreduce_epoch` and :meth:`allreduce_gather_bytes` are collectives."""

    def __init__(self) -> None:
        self.train = WireCounter()
        self.refine = WireCounter()
        self.gather = WireCounter()
        self.totals = {"train": WireCounter(), "refine": WireCounter(), "gather": WireCounter()}

    def allreduce_gather_bytes(self) -> None:
        """Add all ranks' bytes in :attr:`gather` to the run totals (one all_reduce) and reset it."""
        counter = self.gather
        vec = [v for k in WIRE_KINDS for v in (counter.sent[k], counter.fp32[k])]
        t = allreduce_sum(torch.tensor(vec, dtype=torch.float64))
        for j, k in enumerate(WIRE_KINDS):
            self.totals["gather"].add(k, int(t[2 * j]), int(t[2 * j + 1]))
        counter.reset()

    def allreduce_epoch(self, loss_sum: float, steps: int, world: int) -> tuple[float, dict[str, float]]:
        """All ranks' loss and bytes for the epoch (one all_reduce): the same on every rank."""
        counters = (self.train, self.refine)
        vec = [loss_sum]
        for c in counters:
            for k in WIRE_KINDS:
                vec += [c.sent[k], c.fp32[k]]
        t = allreduce_sum(torch.tensor(vec, dtype=torch.float64))
        values = t.tolist()
        loss = values[0] / max(steps, 1)
        wire: dict[str, float] = {"steps": steps, "world_size": world}
        i = 1
        for name, c in zip(("train", "refine"), counters):
            total = self.totals[name]
            for k in WIRE_KINDS:
                sent, fp32 = int(values[i]), int(values[i + 1])
                i += 2
                total.add(k, sent, fp32)
                if name == "train":
                    wire[f"{k}_bytes"] = sent
                    wire[f"{k}_fp32_bytes"] = fp32
                elif sent:
                    wire[f"{name}_{k}_bytes"] = sent
            c.reset()
        train = [wire[f"{k}_bytes"] for k in WIRE_KINDS]
        wire["bytes_per_step"] = sum(train) / max(steps, 1)
        wire["fp32_bytes_per_step"] = sum(wire[f"{k}_fp32_bytes"] for k in WIRE_KINDS) / max(steps, 1)
        return loss, wire

    def summary(self, global_step: int) -> dict[str, Any]:
        """Bytes all ranks sent over the run, by kind, with fp32 equivalents and ratios."""
        out: dict[str, Any] = {}
        for name, c in self.totals.items():
            s: dict[str, Any] = c.summary()
            for k in WIRE_KINDS:
                s[f"{k}_ratio"] = c.ratio(k)
            # A kind that sent nothing has no ratio (None, not inf: the summary must stay valid JSON).
            out[name] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in s.items()}
        steps = max(global_step, 1)
        out["train_bytes_per_step"] = out["train"]["total_bytes"] / steps
        out["train_fp32_bytes_per_step"] = out["train"]["total_fp32_bytes"] / steps
        return out


def steady_throughput(step_times: list[tuple[float, int]]) -> dict[str, float | None]:
    """Steps after the run's first, alone: the rate a long run settles at.

    Why apart from ``seconds_per_step``: that one is the phases' wall time over their steps, so it
    also holds each epoch's shuffle and the first step's one-off costs (buffers, lazy optimizer
    state), which weigh on a benchmark of a few steps but not on an epoch of thousands."""
    rest = step_times[1:]
    seconds = sum(t for t, _ in rest)
    return {
        "first_step_seconds": step_times[0][0] if step_times else None,
        "seconds_per_step": seconds / len(rest) if rest else None,
        "median_step_seconds": float(np.median([t for t, _ in rest])) if rest else None,
        "edges_per_second": sum(n for _, n in rest) / seconds if rest and seconds > 0 else None,
        "steps": len(rest),
    }


__all__ = ["RunWire", "steady_throughput"]
