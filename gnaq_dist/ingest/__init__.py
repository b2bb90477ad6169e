"""Ingest: interaction logs anywhere (fsspec) -> a validated, id-mapped, split dataset.

Public API: :func:`ingest` and :class:`IngestConfig`; the CLI glue is in ``cli``.
"""

from gnaq_dist.ingest.config import ColumnsConfig, IngestConfig, SplitConfig
from gnaq_dist.ingest.pipeline import ingest

__all__ = ["ColumnsConfig", "IngestConfig", "SplitConfig", "ingest"]
