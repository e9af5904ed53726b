"""The library's layers: lower layers import nothing from the layers above them, and no fedctx
modules import each other at module level (no import cycle).

Layers, bottom up: ``fedctx.norm``; ``fedctx.models`` and ``fedctx.optim`` (on norm);
``fedctx.data``; ``fedctx.config``; then the scenarios, strategies, federated runtime, AdaMatch
and the command lines. The imports are read from the sources (``ast``), so a lazy import inside a
function counts for the layering rules; module names follow the package map of
``pyproject.toml`` (``simulations/`` is ``fedctx.scenarios``, ``strategies/`` is
``fedctx.strategies``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Packages above the lower layers: nothing in ``LOWER`` imports them, even lazily.
UPPER = ("fedctx.federated", "fedctx.adamatch", "fedctx.scenarios", "fedctx.strategies",
         "fedctx.simulate", "fedctx.adapt", "fedctx.report")
#: Each lower layer and what it may not import besides ``UPPER``.
LOWER = {
    "fedctx.norm": ("fedctx.models", "fedctx.data", "fedctx.optim", "fedctx.config"),
    "fedctx.models": ("fedctx.data", "fedctx.optim", "fedctx.config"),
    "fedctx.optim": ("fedctx.models", "fedctx.data", "fedctx.config"),
    "fedctx.data": ("fedctx.models", "fedctx.optim"),
}


def package_roots() -> dict[str, Path]:
    """Package name -> folder, from ``[tool.setuptools]`` of ``pyproject.toml``."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setup.get("package-dir", {})
    return {name: REPO / mapped.get(name, name.replace(".", "/")) for name in setup["packages"]}


def modules() -> dict[str, Path]:
    """Every fedctx module (``fedctx.x.y`` -> its file), packages by their ``__init__.py``."""
    roots = package_roots()
    out = {}
    for package, folder in roots.items():
        for path in folder.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
        out.setdefault(package, folder)  # a namespace package (no __init__.py)
    return out


MODULES = modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """The fedctx modules an import statement names (``from p import m`` names ``p.m`` when that
    is a module, else ``p``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:  # import fedctx.norm.context.X -> fedctx.norm.context
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: top-level statements, including inside
    top-level ``if``/``try``/``with`` blocks, but not in functions, classes or
    ``if TYPE_CHECKING:``."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If | ast.Try | ast.With) and not _is_type_checking(node):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
    return found


def imports(module: str, everywhere: bool) -> dict[str, int]:
    """fedctx modules ``module`` imports -> line of the first such import (``everywhere``: also
    inside functions)."""
    path = MODULES[module]
    if path.is_dir():
        return {}
    tree = ast.parse(path.read_text(), str(path))
    nodes = ([n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
             if everywhere else module_level_imports(tree))
    out: dict[str, int] = {}
    for node in nodes:
        for target in _targets(node, module, path):
            if target != module:
                out.setdefault(target, node.lineno)
    return out


def test_modules_found() -> None:
    assert all(_within(m, "fedctx") for m in MODULES)  # nothing generic at the top
    for name in ("fedctx.norm.context", "fedctx.models.digits", "fedctx.data.sources",
                 "fedctx.optim", "fedctx.config", "fedctx.scenarios", "fedctx.scenarios.digits5",
                 "fedctx.strategies", "fedctx.federated.server", "fedctx.simulate"):
        assert name in MODULES, name
    assert imports("fedctx.federated.server", everywhere=False).keys() >= {
        "fedctx.strategies", "fedctx.federated.runtime"}


@pytest.mark.parametrize("layer", sorted(LOWER))
def test_lower_layers_import_nothing_above_them(layer: str) -> None:
    forbidden = UPPER + LOWER[layer]
    bad = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target}"
           for m in MODULES if _within(m, layer)
           for target, line in imports(m, everywhere=True).items()
           if any(_within(target, f) for f in forbidden)]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_module_level() -> None:
    graph = {m: set(imports(m, everywhere=False)) for m in MODULES}
    cycles = _cycles(graph)
    assert not cycles, f"modules importing each other at module level: {cycles}"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]  # the check works


def test_config_and_scenarios_do_not_import_each_other() -> None:
    """The scenarios build on ``fedctx.config``; config names the scenarios only inside the
    ``--scenario`` choices callable, run when a configuration is validated."""
    assert "fedctx.config" in imports("fedctx.scenarios", everywhere=False)
    assert not [m for m in imports("fedctx.config", everywhere=False)
                if _within(m, "fedctx.scenarios")]


def test_importing_lower_layers_loads_nothing_above() -> None:
    """At run time too: importing config and the lower layers loads no upper module."""
    code = ("import sys, fedctx.config, fedctx.norm, fedctx.models, fedctx.data, fedctx.optim; "
            f"print(sorted(m for m in sys.modules if m.startswith({UPPER!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO.parent)
    assert out.stdout.strip() == "[]", out.stdout
