"""Which of the package's source files a module runs: its ``xray`` imports, transitively.

Why: a stage's cache key should change when the code the stage runs changes,
and only then (editing a web page must not retrain a model); the Bento should
pack only what serving imports. Both read the import graph from the source
with ``ast``, without importing anything.

Every ``import`` statement counts, including those inside functions (lazy
imports still run) and under ``TYPE_CHECKING`` (harmless over-inclusion).
Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``, so
those are part of the closure too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "xray"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """``xray.a.b`` -> ``<package_dir>/a/b.py`` or ``<package_dir>/a/b/__init__.py``; None if neither exists."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py") if len(parts) > 1 else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """The dotted names a file's import statements may load (some are attributes, filtered later)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_closure(module: str, package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """``module`` and every package module it imports, directly or not: name -> source file."""
    found: dict[str, Path] = {}
    pending = _with_parents(module)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = module_file(name, package_dir)
        if path is None:
            continue  # an attribute imported by name (`from xray.x import function`), not a module
        found[name] = path
        for imported in _imported_modules(path, name):
            pending.extend(_with_parents(imported))
    if module not in found:
        raise ValueError(f"{module} is not a module under {package_dir}")
    return dict(sorted(found.items()))


def package_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every module of the package, dotted (``xray.components.model_trainer``), packages as their own name."""
    names = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module -> the package modules its import statements name (attributes imported by name resolve to their module)."""
    graph: dict[str, set[str]] = {}
    for module in package_modules(package_dir):
        path = module_file(module, package_dir)
        assert path is not None
        direct = {name for name in _imported_modules(path, module) if module_file(name, package_dir) is not None}
        graph[module] = {name for name in direct if name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Package ``__init__`` modules count like any other."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None
