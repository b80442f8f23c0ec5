"""No import cycle between our modules.

A cycle between two modules breaks only when one of them is the first
imported (a service imported by a daemon entry point before the module it
cycles with: ``ImportError: cannot import name … from partially initialized
module``), which the rest of the suite, importing in its own order, may never
see. So the graph of top-level imports is checked as a whole: imports inside
functions (deliberately late) and under ``if TYPE_CHECKING`` are not edges;
``from package import submodule`` depends on the submodule only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import siterecovery

ROOT = Path(siterecovery.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("siterecovery", *parts))
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    deps: set[str] = set()
    for node in tree.body:  # top level only (an `if` is TYPE_CHECKING or a guard)
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            found = [s for s in subs if s in modules]
            deps.update(found)
            if len(found) < len(subs):
                deps.add(node.module)
    return {d for d in deps if d in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    modules = _modules()
    assert len(modules) > 100
    graph = {
        name: _imports(ast.parse(path.read_text()), modules) - {name}
        for name, path in modules.items()
    }
    assert sum(len(d) for d in graph.values()) > 300  # the graph was read
    assert _cycles(graph) == []


def test_a_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
