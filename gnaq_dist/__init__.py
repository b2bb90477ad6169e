"""gnaq-dist: LightGCN with node-aware quantized embeddings (GNAQ), distributed on Ray.

The public API (docs/api.md): ``ingest``, ``load_dataset``, ``train``, ``evaluate``, ``export``,
``Bundle``, and the configs ``TrainConfig`` and ``IngestConfig``. Importing the package is cheap
and needs no GPU, no running Ray and no network: each name is imported on first use, and heavy
modules (torch, DGL, Ray) only by the submodules that use them.

``train``, ``evaluate`` and ``export`` are also the names of modules of this package
(``gnaq_dist/train/``, ``evaluate.py``, ``export.py``). Python binds a submodule to its
package's attribute when it is imported, which would replace the function; the package keeps
the functions instead. ``from gnaq_dist.train.config import TrainConfig`` and the like are
unaffected; ``import gnaq_dist.train.local as m`` is not available (use ``from ... import``).

Public and internal: what is public is this package's API (``__all__``), the ``gnaq`` command
line and the config schema (the keys docs/config.md lists). Everything else (every module
below, and the names each subpackage exports in its own ``__all__`` for the rest of the library)
is internal: it may change without notice (docs/architecture.md, "Public and internal").

Subpackages (each one's docstring lists its modules):

* :mod:`.ingest`: logs at any fsspec URI -> a validated, id-mapped, cleaned, split dataset;
* :mod:`.train`: the training config, the schedule both trainers follow, the one-process trainer;
* :mod:`.distributed`: W ranks under Ray Train: partition, row exchange, gradient compression, a rank's trainer;
* :mod:`.quant`: the embedding methods (fp, GNAQ and its variants, LSQ, N2UQ, BiGeaR) and their packed storage;
* :mod:`.bundle`: the bundle format, numpy only, shared by export and serving.

Modules, along the data flow:

* :mod:`.api`: the public Python API, one call a stage (docs/api.md);
* :mod:`.cli`: the ``gnaq`` command line, thin wrappers over the library;
* :mod:`.config`: strict dataclass configs from layered YAML and ``key.path=value`` overrides;
* :mod:`.synthetic_logs`: large synthetic Parquet logs with a hidden cluster structure (``gnaq generate``);
* :mod:`.storage`: fsspec URIs, checksums, and the one atomic writer every stage uses;
* :mod:`.concurrency`: a compare-and-swap on an output's commit mark (local ``flock``, S3 conditional PUTs);
* :mod:`.staging`: local staging locked by its writer; a dead writer's leftovers removed by the next;
* :mod:`.overwrite`: what ``--overwrite`` may replace; outputs that must not overlap their inputs;
* :mod:`.dataset`: an ingested dataset read back, verified against its manifest;
* :mod:`.interactions`: ``InteractionData``, the in-memory dataset that training and evaluation read;
* :mod:`.synthetic`: small in-memory synthetic datasets for tests and smoke runs;
* :mod:`.graph`: ``BipartiteGraph``: ``A_hat`` as CSR, the DGL graph, the user -> items CSR;
* :mod:`._dgl`: the one place that imports DGL (shims for DGL 2.1.0 under torch 2.13);
* :mod:`.keyed`: keyed randomness every process computes alike (epoch order, negatives, hash partition);
* :mod:`.methods`: the methods' names and the GNAQ variants' settings, the one registry (no torch);
* :mod:`.propagation`: LightGCN propagation on the full graph or on sampled blocks;
* :mod:`.sampling`: BPR batches with negatives (a rank's share of the global batch), neighbour blocks;
* :mod:`.evaluation`: full-ranking Recall@K / NDCG@K, batched, as sums ranks can all-reduce;
* :mod:`.seeding`: one seed for every random stream a run draws from;
* :mod:`.allocator`: glibc malloc settings that keep freed memory in the process for reuse;
* :mod:`.runlog`: JSON-lines run logs, read back by plots and reports;
* :mod:`.step_timing`: every method's training step timed round-robin on the same batches;
* :mod:`.checkpoint`: the sharded checkpoint format: write, verify, keep the last N, load;
* :mod:`.export`: a checkpoint (or numpy tables) -> an edge bundle;
* :mod:`.serving`: top-K from a bundle with numpy and pyarrow only (``gnaq recommend``);
* :mod:`.evaluate`: ``gnaq evaluate``: a checkpoint, a bundle, popularity or the oracle on the held-out split;
* :mod:`.oracle`: the generator's own ranking of a dataset ingested from a ``gnaq generate`` log;
* :mod:`.configdoc`: docs/config.md generated from the config dataclasses;
* :mod:`.errors`: ``GnaqInputError`` (the user's input is wrong: exit status 2) and its kin;
* :mod:`.interrupts`: SIGTERM and SIGINT as one exception, so cleanup runs;
* :mod:`.lazy`: package attributes imported on first use (``gnaq_dist``, ``train``, ``distributed``);
* :mod:`.reproduce`: ``gnaq reproduce``: every method on one budget, under a protocol, over seeds;
* :mod:`.demo`: ``gnaq run``, the main job on the bundled Last.fm sample.

Package data: ``data/`` (the Last.fm sample ``gnaq run`` ingests, with its ORIGIN.md) and
``configs/`` (``demo.yaml``, what ``gnaq run`` trains).
"""

import sys
import types
from typing import Any

from gnaq_dist.lazy import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {
    "ingest": "gnaq_dist.api",
    "load_dataset": "gnaq_dist.api",
    "train": "gnaq_dist.api",
    "evaluate": "gnaq_dist.api",
    "export": "gnaq_dist.api",
    "checkpoint_uri": "gnaq_dist.api",
    "Bundle": "gnaq_dist.serving",
    "TrainConfig": "gnaq_dist.train.config",
    "IngestConfig": "gnaq_dist.ingest.config",
}
#: API functions named like a module of this package.
_SHADOWED = ("train", "evaluate", "export")
_public = __getattr__ = lazy_exports(__name__, _PUBLIC)


class _Package(types.ModuleType):
    """This package's module type: its API function stays bound where a namesake submodule is imported."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return _public(name)
        return value


sys.modules[__name__].__class__ = _Package


__all__ = [*_PUBLIC, "__version__"]
