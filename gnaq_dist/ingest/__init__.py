"""Ingest: interaction logs anywhere (fsspec) -> a validated, id-mapped, split dataset.

Exports :func:`ingest`, :class:`IngestConfig` (public as ``gnaq_dist.ingest`` and
``gnaq_dist.IngestConfig``) and the config's parts; the rest is internal.
Never imports torch, DGL or Ray (docs/architecture.md, "The walls").

Modules, along the pipeline:

* :mod:`.config`: the ingest config tree, strict dataclasses (``IngestConfig``, ``ColumnsConfig``, ``SplitConfig``);
* :mod:`.pipeline`: read -> map ids -> clean -> split -> write, all validated first;
* :mod:`.reader`: the source resolved once, every footer checked, rows streamed in record batches;
* :mod:`.lightgcn_text`: the LightGCN benchmarks' ``train.txt`` / ``test.txt`` format;
* :mod:`.idmap`: raw id -> contiguous index, per record batch;
* :mod:`.edges`: the compact numpy columns that flow between the stages;
* :mod:`.clean`: de-duplication, k-core, known-pair removal;
* :mod:`.split`: train/test/valid assignment strategies;
* :mod:`.writer`: the dataset layout: split tables, id maps, manifest, committed atomically;
* :mod:`.cli`: ``gnaq ingest``'s argparse glue (imported only by ``gnaq_dist.cli``).
"""

from gnaq_dist.ingest.config import ColumnsConfig, IngestConfig, SplitConfig
from gnaq_dist.ingest.pipeline import ingest

__all__ = ["ColumnsConfig", "IngestConfig", "SplitConfig", "ingest"]
