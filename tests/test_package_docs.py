"""The boundary between public and internal stays written down (docs/architecture.md, "Public
and internal"): every package's docstring lists each of its modules and subpackages, one
``* :mod:`.name`: purpose`` line each, no more and no fewer; every package declares the names
it exports in ``__all__``, and each resolves; docs/architecture.md's module map names every
module (those of ``distributed/`` in docs/distributed.md's table). Read from the files, so a
module added, removed or renamed fails here until its lines follow.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gnaq_dist"
PACKAGES = sorted(p.parent for p in PACKAGE.rglob("__init__.py"))
LISTED = re.compile(r"^\* :mod:`\.(\w+)`: \S", flags=re.M)


def _name(package: Path) -> str:
    return ".".join(package.relative_to(ROOT).parts)


def _docstring(package: Path) -> str:
    return ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))) or ""


def _members(package: Path) -> list[str]:
    """The package's modules and subpackages, by name."""
    modules = [p.stem for p in package.glob("*.py") if p.stem != "__init__"]
    return sorted(modules + [p.name for p in package.iterdir() if (p / "__init__.py").is_file()])


def test_every_package_is_seen():
    assert {_name(p) for p in PACKAGES} >= {
        "gnaq_dist", "gnaq_dist.bundle", "gnaq_dist.distributed", "gnaq_dist.ingest", "gnaq_dist.quant",
        "gnaq_dist.train"}


@pytest.mark.parametrize("package", PACKAGES, ids=_name)
def test_the_package_docstring_lists_each_of_its_modules_once(package):
    listed = LISTED.findall(_docstring(package))
    assert len(listed) == len(set(listed)), f"{_name(package)} lists a module twice: {listed}"
    assert sorted(listed) == _members(package), (
        f"{_name(package)}'s docstring: missing {sorted(set(_members(package)) - set(listed))}, "
        f"stale {sorted(set(listed) - set(_members(package)))}")


def test_the_top_docstring_names_the_package_data():
    data = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"
                  and not (p / "__init__.py").is_file() and not p.name.endswith(".egg-info"))
    doc = _docstring(PACKAGE)
    assert data and [d for d in data if f"``{d}/``" not in doc] == [], data


@pytest.mark.parametrize("package", PACKAGES, ids=_name)
def test_the_package_declares_all_and_each_name_resolves(package):
    module = importlib.import_module(_name(package))
    names = module.__dict__.get("__all__")
    assert isinstance(names, list) and names, f"{_name(package)} declares no __all__"
    assert len(names) == len(set(names))
    missing = [n for n in names if getattr(module, n, None) is None]
    assert missing == [], f"{_name(package)}.__all__ names what it does not have: {missing}"


def _first_cells(path: Path) -> set[str]:
    """The ``*.py`` names in the first cell of each table row of a markdown file."""
    cells = re.findall(r"^\| ([^|]+) \|", path.read_text(encoding="utf-8"), flags=re.M)
    return {name for cell in cells for name in re.findall(r"`([\w/]+\.py)`", cell)}


def test_the_module_maps_name_every_module_and_no_other():
    """docs/architecture.md's map has a row for each module (``distributed/``'s: docs/distributed.md)."""
    mapped = _first_cells(ROOT / "docs" / "architecture.md")
    mapped |= {f"distributed/{m}" for m in _first_cells(ROOT / "docs" / "distributed.md")}
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - mapped) == [], "modules the maps do not name"
    assert sorted(mapped - modules) == [], "the maps name modules that are gone"
