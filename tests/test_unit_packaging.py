"""`pip install .` gives a working xray: its runtime dependencies are in pyproject.toml, pinned as requirements.txt pins them."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO


def _by_name(lines: list[str]) -> dict[str, str]:
    parsed = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): str(r) for r in parsed}


def requirements_txt() -> dict[str, str]:
    lines = [line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return _by_name([line for line in lines if line])


def pyproject() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {name: _by_name(deps) for name, deps in project.get("optional-dependencies", {}).items()}
    return _by_name(project["dependencies"]), extras


def test_requirements_txt_is_pyproject_with_its_extras() -> None:
    runtime, extras = pyproject()
    everything = dict(runtime)
    for deps in extras.values():
        assert not set(deps) & set(everything), deps  # each package declared once
        everything.update(deps)
    assert requirements_txt() == everything


def test_the_runtime_set_runs_xray_and_leaves_test_tools_out() -> None:
    runtime, extras = pyproject()
    assert {"torch", "torchvision", "bentoml", "fastapi", "boto3", "pydicom", "cryptography"} <= set(runtime)
    assert not {"pytest", "playwright", "mlflow"} & set(runtime)
    assert "mlflow" in extras["tracking"] and "pytest" in extras["dev"]


def test_nothing_unused_is_required() -> None:
    """model-signing was tried for run seals and dropped (xray/audit/seal.py); pyopenssl came only with it."""
    assert not {"model-signing", "pyopenssl"} & set(requirements_txt())


def _lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            requirement = Requirement(line.split(" ", 1)[0].strip())
            (spec,) = requirement.specifier
            assert spec.operator == "==", line  # a lock pins exact versions
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_the_lock_pins_exactly_what_requirements_txt_admits() -> None:
    """`make install` installs requirements.lock; `make lock` re-pins it after requirements.txt changes."""
    pins = _lock_pins()
    for name, line in requirements_txt().items():
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        assert Requirement(line).specifier.contains(pins[name], prereleases=True), (line, pins[name])
    assert "--hash=sha256:" in (REPO / "requirements.lock").read_text()
