"""Layers point one way: the import graph of the source tree, and what importing a layer loads.

The graph is read with ``ast`` from every source file of the packages pyproject.toml ships,
counting imports inside functions too (a lazy import is still a dependency; only imports under
``if TYPE_CHECKING:`` are left out, they never run). Units are the top-level packages and, inside
``plugin_service``, its subpackages and top-level modules (``plugin_service.engine``,
``plugin_service.training``, ...).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
Edge = tuple[str, str, str]  # importing unit, imported unit, "module:line" where it happens



def package_dirs() -> dict[str, Path]:
    """Top-level package -> its source directory, as pyproject.toml's package-dir maps them."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = tool.get("package-dir", {})
    tops = {name.split(".")[0] for name in tool["packages"]}
    return {top: ROOT / mapping.get(top, Path(mapping.get("", ".")) / top) for top in sorted(tops)}


def unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "plugin_service" and len(parts) > 1 else parts[0]


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Absolute names of the modules a file imports, skipping ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno
            else:
                yield node.module or "", node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_edges(dirs: dict[str, Path]) -> list[Edge]:
    edges = []
    for top, directory in dirs.items():
        for path in sorted(directory.rglob("*.py")):
            parts = [top, *path.relative_to(directory).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            for target, line in _imports(ast.parse(path.read_text(), str(path)), module, is_package):
                if target.split(".")[0] in dirs and unit(target) != unit(module):
                    edges.append((unit(module), unit(target), f"{module}:{line}"))
    return edges


def find_cycle(edges: list[Edge]) -> list[str]:
    """One cycle of the graph as [a, b, ..., a], or [] when it has none."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def where(edges: list[Edge], cycle: list[str]) -> list[str]:
    return [next(w for a, b, w in edges if (a, b) == step) for step in zip(cycle, cycle[1:], strict=False)]


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return list(import_edges(package_dirs()))


def test_the_graph_reader_sees_imports_and_cycles() -> None:
    """The checks below are only as good as this reader: lazy and relative imports count, cycles are found."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import plugin_service.cli\n"
              "def f():\n    from plugin_service.training import loop\nfrom .engine import x\n")
    found = set(_imports(ast.parse(source), "plugin_service.evaluation.tiers", False))
    assert found == {("typing", 1), ("plugin_service.training", 5), ("plugin_service.evaluation.engine", 6)}
    assert find_cycle([("a", "b", "a:1"), ("b", "c", "b:1"), ("c", "a", "c:1")]) == ["a", "b", "c", "a"]
    assert find_cycle([("a", "b", "a:1"), ("a", "c", "a:2"), ("b", "c", "b:1")]) == []


def test_the_shipped_packages_are_all_read(edges: list[Edge]) -> None:
    assert {"advface", "advface_client", "plugin_service"} <= set(package_dirs())
    assert ("plugin_service.server", "advface") in {(a, b) for a, b, _ in edges}


def test_no_cycle_between_top_level_packages(edges: list[Edge]) -> None:
    top = [(a.split(".")[0], b.split(".")[0], w) for a, b, w in edges if a.split(".")[0] != b.split(".")[0]]
    cycle = find_cycle(top)
    assert not cycle, f"import cycle {' -> '.join(cycle)} via {where(top, cycle)}"


def test_no_cycle_inside_plugin_service(edges: list[Edge]) -> None:
    inner = [e for e in edges if e[0].startswith("plugin_service.") and e[1].startswith("plugin_service.")]
    cycle = find_cycle(inner)
    assert not cycle, f"import cycle {' -> '.join(cycle)} via {where(inner, cycle)}"


@pytest.mark.parametrize(("importer", "imported"), [
    ("plugin_service.training", "plugin_service.evaluation"),
    ("plugin_service.evaluation", "plugin_service.training"),
    ("plugin_service.engine", "plugin_service.training"),
    ("plugin_service.engine", "plugin_service.evaluation"),
    ("plugin_service.server", "plugin_service.training"),
    ("plugin_service.server", "plugin_service.evaluation"),
    ("advface", "plugin_service"),
    ("advface", "advface_client"),
    ("advface_client", "plugin_service"),
])
def test_forbidden_dependency(edges: list[Edge], importer: str, imported: str) -> None:
    bad = [w for a, b, w in edges if a == importer and (b == imported or b.startswith(imported + "."))]
    assert not bad, f"{importer} must not import {imported}: {bad}"


def test_nothing_imports_the_command_line(edges: list[Edge]) -> None:
    bad = [w for a, b, w in edges if b == "plugin_service.cli"]
    assert not bad, f"plugin_service.cli is the top of the graph; imported at {bad}"


def _loaded_after(statement: str) -> set[str]:
    """Top-level modules loaded by ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_importing_the_client_loads_neither_torch_nor_the_server() -> None:
    loaded = _loaded_after("import advface_client, advface_client.cli")
    assert "advface_client" in loaded and "advface" in loaded
    assert not loaded & {"torch", "plugin_service", "torchvision", "facenet_pytorch"}, sorted(loaded)


def test_the_servicer_and_policy_load_no_torch() -> None:
    loaded = _loaded_after("import plugin_service.server.servicer, plugin_service.server.policy, "
                           "plugin_service.server.reassembly")
    assert "plugin_service" in loaded
    assert "torch" not in loaded
