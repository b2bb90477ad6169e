"""The package's import graph: no module imports itself back through others (no cycle), the
partition is a record that imports no exchange, and the distributed trainer does not import
the one-process one. Read from the source (every ``import`` that runs, module level or in a
function; ``if TYPE_CHECKING:`` blocks never run), plus one fresh interpreter for the lazy API.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from P import m`` counts as ``P.m`` when
    ``m`` is a module, else as ``P``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
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
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


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
