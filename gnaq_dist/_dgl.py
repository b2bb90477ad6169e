"""The one place that imports DGL.

Why this module exists: the newest DGL the registry serves for Linux/cp311 is 2.1.0,
built for torch 2.0-2.2. Under the torch 2.13 CPU wheel its plain ``import dgl`` fails
in three ways (see docs/dependencies.md):

1. ``dgl.utils`` imports ``setuptools.extern.packaging``, gone from current
   setuptools: we alias it to the ``packaging`` distribution;
2. and 3. ``dgl.graphbolt`` needs ``torchdata.datapipes`` and a C++ library built per
   torch version (none for 2.13): we register an empty ``dgl.graphbolt`` module before
   the import. GraphBolt is unusable here and nothing in gnaq-dist uses it.

We also set ``DGLBACKEND=pytorch`` so that ``import dgl`` does not write
``~/.dgl/config.json``. The measures apply only when needed: on an environment where
DGL imports cleanly (another DGL build), nothing is patched.

Every other module does ``from gnaq_dist._dgl import dgl``. Ray workers import it the
same way, so the measures hold in every process.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

PATCHES_APPLIED: list[str] = []


def _alias_setuptools_packaging() -> None:
    try:
        importlib.import_module("setuptools.extern.packaging")
        return
    except Exception:
        pass
    import packaging
    import packaging.version

    extern = types.ModuleType("setuptools.extern")
    extern.packaging = packaging  # type: ignore[attr-defined]
    sys.modules.setdefault("setuptools.extern", extern)
    sys.modules["setuptools.extern.packaging"] = packaging
    sys.modules["setuptools.extern.packaging.version"] = packaging.version
    PATCHES_APPLIED.append("setuptools.extern.packaging -> packaging")


def _stub_graphbolt() -> None:
    if "dgl.graphbolt" in sys.modules:
        return
    stub = types.ModuleType("dgl.graphbolt")
    stub.__doc__ = "Stub registered by gnaq_dist._dgl: GraphBolt has no library for this torch."
    sys.modules["dgl.graphbolt"] = stub
    PATCHES_APPLIED.append("dgl.graphbolt stubbed")


def _import_dgl():
    os.environ.setdefault("DGLBACKEND", "pytorch")
    if "dgl" in sys.modules:
        return sys.modules["dgl"]
    _alias_setuptools_packaging()
    _stub_graphbolt()
    return importlib.import_module("dgl")


dgl = _import_dgl()

__all__ = ["dgl", "PATCHES_APPLIED"]
