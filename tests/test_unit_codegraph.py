"""Narrow cache keys: a stage's fingerprint covers the code it runs (its import closure), not all of xray/."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from xray.codegraph import module_closure
from xray.pipeline.store import code_hash, load_manifest, stage_code_hash

from .conftest import REPO, run_cli, tiny_args

STAGE_MODULES = {
    "data_ingestion": "xray.components.data_ingestion",
    "data_transformation": "xray.components.data_transformation",
    "model_trainer": "xray.components.model_trainer",
    "model_evaluation": "xray.components.model_evaluation",
}


def copy_package(tmp_path: Path) -> Path:
    """A private copy of the package (and the default config), safe to edit."""
    shutil.copytree(REPO / "xray", tmp_path / "xray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path / "xray"


def append_comment(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited by a test\n")


def stage_hashes(package: Path) -> dict[str, str]:
    return {stage: stage_code_hash(module, package) for stage, module in STAGE_MODULES.items()}


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_closure_follows_absolute_relative_lazy_and_from_imports(tmp_path: Path) -> None:
    package = tmp_path / "xray"
    write(package / "__init__.py", "")
    write(package / "a.py", "from xray.sub import b\nfrom .c import helper\n\ndef late():\n    import xray.d\n")
    write(package / "sub" / "__init__.py", "")
    write(package / "sub" / "b.py", "from .. import e\nfrom xray.sub.f import thing\n")
    write(package / "c.py", "def helper():\n    pass\n")
    write(package / "d.py", "import os\n")
    write(package / "e.py", "")
    write(package / "sub" / "f.py", "thing = 1\n")
    write(package / "unused.py", "import xray.a\n")  # imports a, but a does not import it
    closure = module_closure("xray.a", package)
    assert set(closure) == {"xray", "xray.a", "xray.sub", "xray.sub.b", "xray.c", "xray.d", "xray.e", "xray.sub.f"}
    assert closure["xray.sub"] == package / "sub" / "__init__.py"
    assert closure["xray.sub.f"] == package / "sub" / "f.py"


def test_closure_of_an_unknown_module_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="xray.nope"):
        module_closure("xray.nope")


def test_stage_closures_leave_out_the_app_serving_and_dev_tools() -> None:
    for module in STAGE_MODULES.values():
        names = set(module_closure(module))
        assert module in names and "xray.pipeline.store" in names
        assert not {n for n in names if n.startswith(("xray.api", "xray.pipeline.training_pipeline"))}, module
        assert "xray.serving.service" not in names and "xray.cli" not in names
    trainer = set(module_closure(STAGE_MODULES["model_trainer"]))
    assert {"xray.models.builders", "xray.evaluation.metrics", "xray.serving.inference", "xray.training.cross_validation", "xray.training.fit"} <= trainer


def test_editing_the_app_keeps_every_stage_key_and_editing_a_stage_changes_its_own(tmp_path: Path) -> None:
    package = copy_package(tmp_path)
    before = stage_hashes(package)
    assert before == stage_hashes(REPO / "xray")  # the copy hashes like the original: paths are package-relative
    whole = code_hash(package_dir=package)

    append_comment(package / "api" / "pages.py")
    append_comment(package / "serving" / "service.py")
    (package / "api" / "templates" / "run.html").write_text("<p>edited</p>")
    assert code_hash(package_dir=package) != whole  # the edit is real: the whole-package hash sees it
    assert stage_hashes(package) == before

    append_comment(package / "components" / "model_trainer.py")
    after = stage_hashes(package)
    assert after["model_trainer"] != before["model_trainer"]
    assert after["model_evaluation"] == before["model_evaluation"]  # stages share artifacts, not code
    assert after["data_ingestion"] == before["data_ingestion"]
    assert after["data_transformation"] == before["data_transformation"]

    append_comment(package / "evaluation" / "metrics.py")
    assert stage_hashes(package)["data_transformation"] == before["data_transformation"]
    assert stage_hashes(package)["model_evaluation"] != after["model_evaluation"]


def test_rerun_after_editing_the_api_reuses_every_stage(tmp_path: Path) -> None:
    """Two real `xray train` runs from a copy of the package, with a page and an API module edited in between."""
    package = copy_package(tmp_path / "src")
    artifacts = tmp_path / "artifacts"
    env = {"PYTHONPATH": str(package.parent)}

    def train() -> str:
        result = run_cli("train", "--data", "demo", *tiny_args(artifacts), cwd=package.parent, env=env)
        assert result.returncode == 0, result.stderr
        match = re.search(r"^run (\S+): succeeded", result.stdout, re.M)
        assert match, result.stdout
        return match.group(1)

    first = train()
    append_comment(package / "api" / "routes.py")
    (package / "api" / "templates" / "runs.html").write_text("<p>edited</p>")
    second = train()
    manifests = [load_manifest(artifacts, run_id) for run_id in (first, second)]
    assert manifests[0].code["code_hash"] != manifests[1].code["code_hash"]  # the package did change
    for stage in ("data_transformation", "model_trainer", "model_evaluation"):
        assert manifests[0].stages[stage].cached_from is None
        assert manifests[1].stages[stage].cached_from == first, stage
    assert manifests[1].stages["model_pusher"].status == "succeeded"


def test_bento_packs_exactly_what_serving_imports() -> None:
    """bentofile.yaml's include list is the import closure of xray.serving.service (plus nothing else from xray/)."""
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    included = {Path(p) for p in bentofile["include"]}
    needed = {path.relative_to(REPO) for path in module_closure("xray.serving.service").values()}
    assert included == needed
