"""Imports run one way: taskheads (cli, demo, report, server) -> flows -> tasks -> pipeline / training ->
heads / storage -> core, and core imports nothing of the project.

The graph is read from the source (ast), every import counted: module level and inside functions
alike, since a lazy import is still a dependency (it only moves the cycle to run time).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a package may import only packages of a lower rank (never one of its own rank: heads and storage
# know nothing of each other, so storage never imports heads)
RANK = {"core": 0, "heads": 1, "storage": 1, "training": 2, "pipeline": 2, "tasks": 3, "flows": 4, "taskheads": 5}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of a file, relative ones resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
    return out


def package_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> where: 'file:line imports module'."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in RANK:
        for path in sorted((root / package).rglob("*.py")):
            for target, line in imports(path, root):
                top = target.split(".")[0]
                if top in RANK and top != package:
                    edges.setdefault((package, top), []).append(f"{path.relative_to(root)}:{line} imports {target}")
    return edges


def find_cycle(edges) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_project_package_has_a_rank():
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert found == set(RANK), f"new package(s) {found - set(RANK)}: give them a place in the layers"


def test_packages_import_without_cycles():
    edges = package_edges()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle) + "; " + "; ".join(
        edges[(a, b)][0] for a, b in zip(cycle, cycle[1:]))


def test_imports_only_go_down_the_layers():
    wrong = [f"{a} -> {b}: {where[0]}" for (a, b), where in sorted(package_edges().items()) if RANK[b] >= RANK[a]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    """The check itself: a function-local import and a relative one both count."""
    for package, body in {"core": "def f():\n    from storage import db\n",
                          "storage": "from ..heads import base\nfrom . import db\n"}.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "x.py").write_text(body)
    edges = package_edges(tmp_path)
    assert set(edges) == {("core", "storage"), ("storage", "heads")}
    assert edges[("core", "storage")] == ["core/x.py:2 imports storage"]
