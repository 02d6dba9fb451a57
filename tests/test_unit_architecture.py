"""The layout is the contract: one declared table of which package may import which, stages meet only
through artifacts, and the package has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from xray.codegraph import PACKAGE_DIR, find_cycle, import_graph
from xray.pipeline.training_pipeline import STAGES

COMPONENTS = "xray.components"

# The global modules: anything may import them, and they import only each other.
GLOBAL = ("xray", "xray.errors", "xray.typed", "xray.capability", "xray.codegraph", "xray.ports")
RECORDS = ("xray.entity", *GLOBAL)
BELOW_STAGES = (
    *RECORDS, "xray.data", "xray.models", "xray.config", "xray.pipeline", "xray.evaluation", "xray.audit",
    "xray.serving", "xray.training",
)

# unit -> the units its modules may import (besides their own unit). A module belongs to the longest unit
# naming it or a package above it; a module of no declared unit fails the test, so a new one is placed here.
# Read bottom-up: every unit lists only units above it in this table, which the test checks (no cycle).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "xray": (),  # the package root: its version only
    "xray.errors": (),
    "xray.typed": (),
    "xray.codegraph": (),
    "xray.ports": (),
    "xray.capability": ("xray.typed",),
    "xray.entity": ("xray.errors", "xray.typed"),  # records only: no torch, no loaders, no stage
    "xray.data": RECORDS,
    "xray.models": ("xray.entity", "xray.errors"),
    "xray.config": (*RECORDS, "xray.data"),  # the YAML loader checks names the data layer defines
    "xray.pipeline": RECORDS,  # store, stage and run ids; the orchestrator is its own unit below
    "xray.evaluation": (*RECORDS, "xray.models", "xray.data"),
    "xray.audit": (*RECORDS, "xray.pipeline", "xray.config"),  # runs are read through the store
    "xray.serving": (*RECORDS, "xray.models", "xray.data", "xray.evaluation", "xray.audit"),
    "xray.training": (*RECORDS, "xray.models", "xray.data", "xray.evaluation", "xray.serving", "xray.config"),
    COMPONENTS: BELOW_STAGES,  # and never one another (tested below)
    "xray.pipeline.training_pipeline": (*BELOW_STAGES, COMPONENTS),
    "xray.tracking": (*BELOW_STAGES, COMPONENTS),  # exports a finished run: the pusher's model spec
    "xray.cli": (*BELOW_STAGES, "xray.pipeline.training_pipeline", "xray.tracking"),
    "xray.__main__": ("xray.cli",),
    "xray.api": (*BELOW_STAGES, "xray.pipeline.training_pipeline", "xray.cli"),  # the worker runs the CLI
}


def unit_of(module: str) -> str | None:
    """The declared unit a module belongs to: the longest one naming it or a package above it."""
    named = [u for u in MAY_IMPORT if module == u or (u != "xray" and module.startswith(u + "."))]
    return max(named, key=len) if named else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import the table does not allow, as 'importer -> imported', lazy ones included."""
    found = []
    for module in sorted(graph):
        unit = unit_of(module)
        for imported in sorted(graph[module]):
            target = unit_of(imported)
            if target != unit and target not in MAY_IMPORT.get(unit or "", ()):
                found.append(f"{module} -> {imported}")
    return found


def test_every_module_has_a_declared_layer() -> None:
    assert not [m for m in import_graph() if unit_of(m) is None]


def test_the_declared_layers_have_no_cycle() -> None:
    table = {unit: set(allowed) - {unit} for unit, allowed in MAY_IMPORT.items()}
    assert find_cycle(table) is None
    assert all(set(allowed) <= set(MAY_IMPORT) for allowed in MAY_IMPORT.values())


def test_no_module_imports_upward() -> None:
    """Every import statement, including those inside functions and under TYPE_CHECKING, follows the table."""
    assert upward_imports(import_graph()) == []


def test_the_layer_check_can_fail() -> None:
    """A record importing a stage, or the store importing audit lazily, is found."""
    graph = {
        "xray.entity.artifact_entity": {"xray.models.builders", "xray.errors"},
        "xray.pipeline.store": {"xray.audit.seal", "xray.entity.artifact_entity"},
        "xray.audit.seal": {"xray.pipeline.store"},
    }
    assert upward_imports(graph) == ["xray.entity.artifact_entity -> xray.models.builders", "xray.pipeline.store -> xray.audit.seal"]


def test_each_package_docstring_names_what_it_may_import() -> None:
    """The docstrings of the domain packages say what the table allows them (the global modules go unnamed)."""
    for package in ("data", "models", "evaluation", "serving", "audit", "pipeline", "training"):
        doc = " ".join((ast.get_docstring(ast.parse((PACKAGE_DIR / package / "__init__.py").read_text())) or "").split())
        unit = f"xray.{package}"
        named = [u for u in MAY_IMPORT[unit] if u not in GLOBAL]
        assert [u for u in named if f"``{u}" not in doc] == [], unit


def test_the_top_level_holds_only_global_modules() -> None:
    modules = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(modules) <= 8, modules


def test_no_component_imports_another_component() -> None:
    graph = import_graph()
    components = {m for m in graph if m.startswith(COMPONENTS + ".")}
    assert len(components) == 5, sorted(components)  # exactly the five stages live there
    crossing = {m: sorted(d for d in graph[m] if d in components) for m in components}
    assert not {m: deps for m, deps in crossing.items() if deps}


def test_the_package_has_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_find_cycle_names_the_cycle() -> None:
    """The check above can fail: a cycle through three modules is found and named in order."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    package = tmp_path / "xray"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "sub/b.py", "c.py"):
        (package / name).write_text("")
    (package / "sub" / "a.py").write_text("from . import b\n\ndef f():\n    from xray.c import thing\n")
    graph = import_graph(package)
    assert graph["xray.sub.a"] >= {"xray.sub.b", "xray.c"}


def test_every_stage_has_the_one_shape() -> None:
    """name, cache policy, fingerprint(config, inputs) and run(ctx, inputs), in the order the pipeline runs them."""
    assert [s.STAGE for s in STAGES] == [
        "data_ingestion", "data_transformation", "model_trainer", "model_evaluation", "model_pusher",
    ]
    for stage in STAGES:
        assert isinstance(stage.CACHED, bool)
        tree = ast.parse(Path(stage.__file__).read_text())
        functions = {n.name: [a.arg for a in n.args.args] for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert functions.get("fingerprint") == ["config", "inputs"], stage.STAGE
        assert functions.get("run") == ["ctx", "inputs"], stage.STAGE


def test_no_function_in_the_package_runs_past_60_lines() -> None:
    too_long = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                too_long.append(f"{path.relative_to(PACKAGE_DIR)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not too_long
