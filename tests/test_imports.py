"""The project's import graph, read from the source (every import counts: top-level, inside functions,
under ``TYPE_CHECKING``, and the engine package's lazy names): no cycles, and the layers hold.

Layers: ``service`` -> (``shortcuts.calibration``, ``shortcuts.engine``) -> core (the rest of
``shortcuts``); calibration may use the engine, the engine never uses calibration, the commands
(``cli``, ``fit``, ``bench``) or the service; core uses neither; nothing but ``shortcuts.lab`` imports
``shortcuts.lab``, which may import anything; ``loadtest`` (an HTTP client) takes only the
request literals from ``shortcuts.engine.settings``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shortcuts", "service", "loadtest")
COMMANDS = ("shortcuts.cli", "shortcuts.fit", "shortcuts.study", "shortcuts.bench")
MAY_IMPORT = {
    "core": {"core"},
    "engine": {"engine", "core"},
    "calibration": {"calibration", "engine", "core"},
    "commands": {"commands", "calibration", "engine", "core"},
    "service": {"service", "calibration", "engine", "core"},
    "loadtest": {"loadtest", "engine"},  # the request's literals (engine.settings, torch-free)
    "lab": {"lab", "commands", "calibration", "engine", "core", "service"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [base, *(f"{base}.{a.name}" for a in node.names)]
    out = []
    for n in names:
        while n and n not in known and "." in n:
            n = n.rsplit(".", 1)[0]
        if n in known and n != name:
            out.append(n)
    return out


def _lazy(tree: ast.Module) -> list[str]:
    """The modules a package's ``_LAZY = {name: module}`` loads on first use (``shortcuts.engine``)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_LAZY"]:
            return [str(v) for v in ast.literal_eval(node.value).values()]
    return []


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for t in _targets(name, path, node, known)}
        graph[name] = deps | {m for m in _lazy(tree) if m in known}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                out.append(sorted([v, *comp]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "shortcuts":
        return parts[0]
    if len(parts) > 1 and parts[1] in ("lab", "engine", "calibration"):
        return parts[1]
    return "commands" if module in COMMANDS else "core"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph: dict[str, set[str]]) -> None:
    """Function-level, TYPE_CHECKING and lazy imports are edges (else a cycle could hide behind one)."""
    assert "shortcuts.calibration.agreement" in graph["shortcuts.cli"]  # inside a handler
    assert "shortcuts.engine.api" in graph["service.engine"]  # under TYPE_CHECKING
    assert "shortcuts.engine.decoder" in graph["shortcuts.engine"]  # the package's lazy names
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_layers(graph: dict[str, set[str]]) -> None:
    wrong = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in graph.items() for b in deps
                   if layer(b) not in MAY_IMPORT[layer(a)])
    assert wrong == []


def test_the_product_never_imports_lab(graph: dict[str, set[str]]) -> None:
    assert sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                  if layer(b) == "lab" and layer(a) != "lab") == []
