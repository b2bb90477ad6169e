"""Per-epoch quantization figures: the share of codes that changed, the layer-0 error.

Why apart: both trainers log them in every ``epoch`` record of metrics.jsonl, and a
distributed run sums each rank's counts first, so the figures are sums until the end.

* ``codes_changed``: codes that differ between the epoch's start and its end, over all
  codes (GNAQ: refinement's re-assignments; GNAQ-STE: codes moved by the latent).
* ``layer0_error``: ``mean |x - Q(x)| / mean |x|`` over the layer-0 table, where x is the
  full-precision table the method trains and Q(x) the quantized rows propagation reads
  (:meth:`~gnaq_dist.quant.base.EmbeddingMethod.layer0_error`: the latent for LSQ, N2UQ
  and GNAQ-STE; for GNAQ, which has no fp table, its rows with fp32 levels against the
  same rows with levels in ``model.level_dtype``, as stored).

A figure a method cannot have (fp; codes for LSQ) is left out of the record.
"""

from __future__ import annotations

import torch

from gnaq_dist.quant.base import EmbeddingMethod


def epoch_sums(method: EmbeddingMethod, codes_before: torch.Tensor | None,
               level_dtype: torch.dtype) -> torch.Tensor:
    """float64 ``[changed, codes, sum |x - Q(x)|, sum |x|, has codes, has error]`` over this
    method's rows (summable over ranks)."""
    changed, total = method.codes_changed(codes_before) if codes_before is not None else (0, 0)
    err = method.layer0_error(level_dtype)
    diff, mag = err if err is not None else (0.0, 0.0)
    return torch.tensor([changed, total, diff, mag, float(codes_before is not None), float(err is not None)],
                        dtype=torch.float64)


def epoch_fields(sums: torch.Tensor) -> dict[str, float]:
    """The record's fields from (possibly rank-summed) :func:`epoch_sums`."""
    changed, total, diff, mag, has_codes, has_err = sums.tolist()
    out: dict[str, float] = {}
    if has_codes > 0:
        out["codes_changed"] = changed / total if total else 0.0
    if has_err > 0:
        out["layer0_error"] = diff / mag if mag else 0.0
    return out


__all__ = ["epoch_fields", "epoch_sums"]
