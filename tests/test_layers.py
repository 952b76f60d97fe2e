"""The core library's import graph, built from the sources: no circle, no reach outside the core,
and the side that reads packages never imports the side that builds them.

Every import counts, at module level or inside a function (an import moved into a function to
dodge a circle is still a circle); only imports under ``if TYPE_CHECKING:`` are left out, since
they never run. ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "sota_serve"

#: The side that writes models and their records; what reads or serves a package imports none of it.
BUILDING: tuple[str, ...] = (
    "sota_serve.building.export",
    "sota_serve.building.quantize",
    "sota_serve.building.calibration",
    "sota_serve.building.ensemble",
    "sota_serve.building.model_readme",
    "sota_serve.building.agreement",
)
#: Front doors that offer building commands (``sota-serve quantize``) beside the reading ones.
FRONT: tuple[str, ...] = ("sota_serve.cli",)
#: Top-level packages the core must not import: it is what they build on.
OUTSIDE: tuple[str, ...] = ("bento", "training", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / CORE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth, except those that only type checkers run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(the module or top-level package each import of ``path`` loads, line)."""
    module = module_name(path)
    out: list[tuple[str, int]] = []
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
            continue
        source = _absolute(node, module, path.name == "__init__.py")
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            out.append((sub if sub in modules else source, node.lineno))
    return out


def graph() -> tuple[dict[str, dict[str, int]], dict[str, list[tuple[str, int]]]]:
    """Edges among core modules (target -> first line), and every import by module."""
    modules = core_modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    everything: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        everything[name] = imported(path, modules)
        for target, line in everything[name]:
            if target in modules and target != name:
                edges[name].setdefault(target, line)
    return edges, everything


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def _within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def test_the_graph_sees_function_level_and_submodule_imports():
    """The reader above is what the other tests rely on: check it on imports the core has."""
    edges, _ = graph()
    assert "sota_serve.formats.onnx" in edges["sota_serve.formats"]  # from ... import ONNX
    assert "sota_serve.package.precision" in edges["sota_serve.cli"]  # a module named by a from-import
    assert "sota_serve.runtime.onnx" in edges["sota_serve.runtime"]  # inside a function
    assert "sota_serve.package.loading" not in edges["sota_serve.runtime"]  # under TYPE_CHECKING only
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_no_circle_among_core_modules():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(
        f"{a} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"


def test_the_core_imports_nothing_built_on_it():
    _, everything = graph()
    bad = [f"{m}:{line} imports {target}" for m, imports in everything.items()
           for target, line in imports if target.split(".")[0] in OUTSIDE]
    assert not bad, "\n".join(bad)


def test_the_core_loads_no_module_by_name():
    """importlib.import_module or __import__ would hide an edge from the graph above."""
    for name, path in core_modules().items():
        text = path.read_text(encoding="utf-8")
        assert "import_module(" not in text and "__import__(" not in text, name


def test_reading_never_imports_building():
    edges, _ = graph()
    modules = set(edges)
    for name in BUILDING:
        assert any(_within(m, (name,)) for m in modules), f"{name} is not a module of the core any more"
    bad = [f"{m}:{line} imports {target}" for m, targets in edges.items()
           if not _within(m, BUILDING + FRONT)
           for target, line in targets.items() if _within(target, BUILDING)]
    assert not bad, "the side that reads packages imports the side that builds them:\n" + "\n".join(bad)
