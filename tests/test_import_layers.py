"""The package's import graph has no circle and no lower package reaches up into the engine.

The graph is read statically (``ast``, nothing is imported). An edge ``a -> b`` is any import of
module ``b`` written in module ``a``: at module level, inside a function or class (a lazy
import runs too, so it counts), and under ``if TYPE_CHECKING:``. ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg``. The trainer registry loads a
recipe's module by name (``importlib``), so the modules named in
``lesionkit.engine.registry.TRAINER_MODULES`` are edges from the registry as well. Not edges:
the implicit import of a parent package (``import lesionkit.data.spec`` runs
``lesionkit/__init__.py`` first) and names that only appear in strings or docstrings.

Layers, from the bottom: ``data``, ``metrics``, ``kernels``, ``layers`` and ``losses`` must not
import ``engine``, ``models`` or ``cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lesionkit

PACKAGE = Path(lesionkit.__file__).parent
LOWER = ("data", "metrics", "kernels", "layers", "losses")
UPPER = ("engine", "models", "cli")


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from . import x / from ..y import z
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join(here + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _registry_modules(path: Path) -> list[str]:
    """The values of ``TRAINER_MODULES = {...}`` ("module:Class" or "module")."""
    for node in ast.walk(ast.parse(path.read_text())):
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "TRAINER_MODULES" and isinstance(node.value, ast.Dict):
            return [v.value.split(":")[0] for v in node.value.values if isinstance(v, ast.Constant)]
    raise AssertionError(f"{path} defines no TRAINER_MODULES dict literal")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the lesionkit modules it imports (see the module docstring for what counts)."""
    modules = module_files(package)
    root = package.name
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(module, is_package, node, modules):
                while target not in modules and "." in target:  # an attribute of a module: the module
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != module and target.split(".")[0] == root:
                    graph[module].add(target)
    registry = f"{root}.engine.registry"
    if registry in modules:
        for target in _registry_modules(modules[registry]):
            assert target in modules, f"TRAINER_MODULES names {target!r}, which is no module of the package"
            graph[registry].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    def layer(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else ""

    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if layer(m) in LOWER and layer(t) in UPPER)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert len(graph) > 50
    # Imports at module level, inside functions and by the registry's module names all count.
    assert "lesionkit.engine.config" in graph["lesionkit.engine.trainer"]
    assert "lesionkit.engine.trainer" in graph["lesionkit.engine.registry"]
    assert "lesionkit.models.registry" in graph["lesionkit.models"]


def test_no_import_circle_inside_the_package():
    found = cycles(import_graph())
    assert not found, "import circles (each group imports itself through the others): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_lower_packages_do_not_import_engine_models_or_cli():
    found = upward_imports(import_graph())
    assert not found, f"{', '.join(LOWER)} must not import {', '.join(UPPER)}: " + "; ".join(found)


def test_a_planted_circle_and_upward_import_are_found(tmp_path):
    """The checks catch what they are for, on a small package written here."""
    pkg = tmp_path / "lesionkit"
    for folder in ("engine", "data"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "registry.py").write_text("TRAINER_MODULES = {'x': 'lesionkit.engine.trainer:Trainer'}\n")
    (pkg / "engine" / "config.py").write_text("def load():\n    from lesionkit.engine.registry import get\n")
    (pkg / "engine" / "trainer.py").write_text("from lesionkit.engine import config\n")
    (pkg / "data" / "check.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from ..engine.trainer import Trainer\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["lesionkit.engine.config", "lesionkit.engine.registry", "lesionkit.engine.trainer"]]
    assert upward_imports(graph) == ["lesionkit.data.check -> lesionkit.engine.trainer"]
