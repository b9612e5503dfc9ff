"""The layers of the code base: imports only point down, and core has no import circle.

Read from the source with ``ast`` (every import, at module level or inside a function), not by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Top-level packages from the top of the import graph down; a package may import only those after it.
LAYERS: tuple[str, ...] = ("deployments", "flows", "tasks", "core")
#: The most lines a module in core may have (issue 28: a module past it holds more than one thing).
MAX_CORE_MODULE_LINES = 600
#: Modules still over the limit, each a known debt; one that shrinks below it must leave the list.
OVERSIZED_CORE_MODULES: frozenset[str] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names (``from core import gate`` -> ``core.gate``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_core_has_no_import_circle() -> None:
    core = {name: {t for t in targets if t.startswith("core")} for name, targets in graph().items()
            if name.startswith("core")}
    assert cycles(core) == []


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    above = LAYERS[: LAYERS.index(layer)]
    upward = sorted(f"{name} -> {target}" for name, targets in graph().items() if name.split(".")[0] == layer
                    for target in targets if target.split(".")[0] in above)
    assert upward == []


def test_core_never_imports_prefect() -> None:
    offenders = sorted(module_name(p) for p in (ROOT / "core").rglob("*.py")
                       if any(m == "prefect" or m.startswith("prefect.") for m in imports_of(p)))
    assert offenders == []


def test_no_core_module_is_over_the_size_limit_but_the_listed_ones() -> None:
    lines = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / "core").rglob("*.py")}
    over = {name for name, n in lines.items() if n > MAX_CORE_MODULE_LINES}
    assert sorted(over - OVERSIZED_CORE_MODULES) == [], "split them along their seams"
    assert sorted(OVERSIZED_CORE_MODULES - over) == [], "under the limit now: take them off the list"


def test_the_circle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
