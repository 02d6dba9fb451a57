"""The layout is the contract: stages meet only through artifacts, and the package has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from xray.codegraph import PACKAGE_DIR, find_cycle, import_graph
from xray.pipeline.training_pipeline import STAGES

COMPONENTS = "xray.components"


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
