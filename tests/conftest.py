"""Shared fixtures: a private BentoML home, tiny configs, the shared datasets when present."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PNEUMONIAMNIST = SHARED / "datasets" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
COVID3 = SHARED / "datasets" / "covid19-3class" / "train"

# Fast settings for end-to-end runs: a few images, one short epoch.
TINY = [
    "trainer.epochs=1",
    "trainer.min_steps=0",
    "trainer.candidates=[simple_cnn]",
    "trainer.batch_size=16",
    "transformation.image_size=32",
    "ingestion.demo_images_per_class=12",
    "ingestion.min_images_per_class=5",
    "evaluation.gradcam_per_class=1",
    "gate.min_roc_auc=0",
    "trainer.time_budget=none",  # no planning measurements; tests/test_time_budget.py covers the budget
]


def needs_shared(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"shared dataset not found at {path} (../shared is absent)")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """BentoML fixes its home when first imported, and collecting the test modules imports it: so the
    session's private home must be in the environment before collection, not only from the fixtures on."""
    os.environ["BENTOML_HOME"] = str(config._tmp_path_factory.getbasetemp() / "bentoml-home")


@pytest.fixture(scope="session", autouse=True)
def signing_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One run-sealing key and one BentoML home for the session, never the developer's ~/.config/xray or ~/bentoml.

    Session-scoped: module fixtures that train runs start before any function-scoped fixture, and every
    run and every verify must agree on the key.
    """
    keys = tmp_path_factory.mktemp("xray-keys")
    names = ("XRAY_KEYS_DIR", "XRAY_SIGNING_KEY", "BENTOML_HOME")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["XRAY_KEYS_DIR"] = str(keys)
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.getbasetemp() / "bentoml-home")
    try:
        yield keys
    finally:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the developer's model store; tests needing their own store pass BENTOML_HOME to a subprocess."""
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path_factory.getbasetemp() / "bentoml-home"))


def tiny_args(artifacts: Path, *extra: str) -> list[str]:
    args = []
    for item in [*TINY, f"artifacts_dir={artifacts}", *extra]:
        args += ["--set", item]
    return args


def run_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process: what a user sees, tracebacks included."""
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "xray", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def wait_until_ready(process: subprocess.Popen, url: str, timeout_s: float, log_tail) -> bool:
    """Poll ``url`` until it answers 200; raise with the server's log if the process dies first.

    Returns False when ``timeout_s`` passes, so the caller stops the server its own way.
    """
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False
