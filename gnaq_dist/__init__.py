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
"""

import sys
import types
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
#: API functions named like a module of this package.
_SHADOWED = ("train", "evaluate", "export")


def _public(name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)


class _Package(types.ModuleType):
    """This package's module type: its API function stays bound where a namesake submodule is imported."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return _public(name)
        return value


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return _public(name)
    raise AttributeError(f"module 'gnaq_dist' has no attribute {name!r}")


__all__ = [*_PUBLIC, "__version__"]
