"""The package's import graph: no module imports itself back through others (no cycle), the
partition is a record that imports no exchange, the distributed trainer does not import the
one-process one, and the walls of docs/architecture.md hold (serving: no torch, Ray or DGL;
quant/ and propagation: no Ray, no torch.distributed; ingest: no torch; the library: no
pipelines/, benchmarks/ or CLI module). Read from the source (every ``import`` that runs,
module level or in a function; ``if TYPE_CHECKING:`` blocks never run), plus fresh
interpreters for what an import really loads.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gnaq_dist"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imports for annotations, never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skip.update(id(n) for n in ast.walk(node))
    return skip


def _imports(path: Path, name: str, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(the package's modules, other dotted names) that module ``name`` at ``path`` imports.

    ``from P import m`` counts as ``P.m`` when ``m`` is a module of the package, else as ``P``;
    outside the package it counts as both ``P`` and ``P.m`` (``from torch import distributed``
    imports ``torch.distributed``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != PACKAGE.name:
                outside.add(base)
                outside.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
                continue
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            if target.split(".")[0] != PACKAGE.name:
                outside.add(target)
                continue
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                inside.add(target)
    return inside, outside


@functools.cache
def _scan() -> dict[str, tuple[set[str], set[str]]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    return {name: set(inside) for name, (inside, _) in _scan().items()}


def outside_imports() -> dict[str, set[str]]:
    """Module -> the dotted names from outside the package it imports (``torch.distributed``,
    ``pyarrow.parquet``, ``pipelines.compare_runs`` ...)."""
    return {name: set(outside) for name, (_, outside) in _scan().items()}


def reachable(graph: dict[str, set[str]], starts: list[str]) -> set[str]:
    """``starts`` and every module of the package they import, directly or through others."""
    seen, todo = set(starts), list(starts)
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_reads_the_distributed_package():
    graph = import_graph()
    assert "gnaq_dist.distributed.comm" in graph["gnaq_dist.distributed.trainer"]
    assert "gnaq_dist.checkpoint" in graph["gnaq_dist.distributed.checkpointing"]
    # evaluation names the trainer only for its annotations (under TYPE_CHECKING)
    assert "gnaq_dist.distributed.trainer" not in graph["gnaq_dist.distributed.evaluation"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_partition_is_a_record_and_distributed_does_not_import_the_local_trainer():
    graph = import_graph()
    distributed = {m for m in graph["gnaq_dist.distributed.partition"] if m.startswith("gnaq_dist.distributed")}
    assert distributed == set(), distributed
    for name, targets in graph.items():
        if name.startswith("gnaq_dist.distributed"):
            assert "gnaq_dist.train.local" not in targets, name


def test_importing_the_distributed_package_loads_nothing_heavy_until_a_name_is_used():
    code = (
        "import sys\n"
        "import gnaq_dist.distributed as d\n"
        "print(sorted(m for m in ('torch', 'dgl', 'ray') if m in sys.modules))\n"
        "print(sorted(d.__all__) == sorted(n for n in d.__all__ if getattr(d, n, None) is not None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.split()
    assert out == ["[]", "True"]


def test_the_distributed_docstring_lists_every_module_above_the_ones_it_imports():
    import re

    import gnaq_dist.distributed as package

    listed = re.findall(r"^\* :mod:`\.(\w+)`:", package.__doc__, flags=re.M)
    present = sorted(p.stem for p in (PACKAGE / "distributed").glob("*.py") if p.stem != "__init__")
    assert sorted(listed) == present
    graph = import_graph()
    position = {f"gnaq_dist.distributed.{m}": i for i, m in enumerate(listed)}
    upward = [(m, t) for m, i in position.items() for t in graph[m] if position.get(t, len(listed)) <= i]
    assert upward == [], upward


# The walls of docs/architecture.md: (where, what it must never import, why). A module's
# imports count with everything of the package it imports in turn (function-level included).
WALLS = [
    (["gnaq_dist.serving"], ("torch", "ray", "dgl"),
     "an edge device serves a bundle with numpy and pyarrow"),
    ([m for m in _modules() if m.startswith("gnaq_dist.quant")] + ["gnaq_dist.propagation"],
     ("ray", "torch.distributed", "gnaq_dist.distributed"),
     "the methods and propagation run alike in one process and in a rank"),
    ([m for m in _modules() if m.startswith("gnaq_dist.ingest")], ("torch", "dgl", "ray"),
     "ingest is data engineering: pyarrow, fsspec and numpy"),
]

CLI_MODULES = ("gnaq_dist.cli", "gnaq_dist.ingest.cli")


def _banned(name: str, banned: tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def test_the_scan_sees_function_level_and_from_imports():
    outside = outside_imports()
    assert {"torch.distributed", "ray.train"} <= outside["gnaq_dist.distributed.ray_launch"]
    assert "gnaq_dist.distributed.trainer" in import_graph()["gnaq_dist.distributed.ray_launch"]  # in a function
    assert "torch" in outside["gnaq_dist.quant.base"]
    assert _banned("torch.distributed.distributed_c10d", ("torch.distributed",))
    assert not _banned("torch.distributions", ("torch.distributed",))
    # a wall does see a forbidden import: the distributed trainer's closure reaches Ray's launcher
    closure = reachable(import_graph(), ["gnaq_dist.cli"])
    assert any(_banned(n, ("ray",)) for m in closure for n in outside[m])


@pytest.mark.parametrize("starts, banned, why", WALLS, ids=["serving", "quant+propagation", "ingest"])
def test_wall_in_the_source(starts, banned, why):
    graph, outside = import_graph(), outside_imports()
    breaches = sorted(f"{m} imports {n}" for m in reachable(graph, starts)
                      for n in outside[m] | graph[m] if _banned(n, banned))
    assert breaches == [], f"{why}: {breaches}"


def test_the_library_imports_no_pipeline_benchmark_or_cli():
    graph, outside = import_graph(), outside_imports()
    breaches = sorted(f"{m} imports {n}" for m in graph for n in outside[m] if _banned(n, ("pipelines", "benchmarks")))
    breaches += sorted(f"{m} imports {t}" for m in graph if m != "gnaq_dist.cli"
                       for t in graph[m] if t in CLI_MODULES)
    assert breaches == [], breaches


def _loaded_after_import(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print([w for w in {watched!r} if w in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_importing_quant_and_propagation_loads_no_ray():
    # (torch.distributed cannot be told apart here: ``import torch`` loads it; the source scan holds that wall)
    assert _loaded_after_import(WALLS[1][0], ("ray",)) == []


def test_importing_ingest_loads_no_torch():
    assert _loaded_after_import(WALLS[2][0], ("torch", "dgl", "ray")) == []
