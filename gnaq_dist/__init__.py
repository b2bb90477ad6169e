"""gnaq-dist: LightGCN with node-aware quantized embeddings (GNAQ), distributed on Ray.

The public API (docs/api.md): ``ingest``, ``load_dataset``, ``train``, ``evaluate``, ``export``,
``Bundle``, and the configs ``TrainConfig`` and ``IngestConfig``. Importing the package is cheap
and needs no GPU, no running Ray and no network: each name is imported on first use, and heavy
modules (torch, DGL, Ray) only by the submodules that use them.
"""

from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gnaq_dist' has no attribute {name!r}")


__all__ = [*_PUBLIC, "__version__"]
