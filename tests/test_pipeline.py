"""End to end through the real `xray` command: runs, artifacts, cache, verify, bad input."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from xray.pipeline.store import list_runs, load_manifest

from .conftest import run_cli, tiny_args
from .data_builders import class_folder


def run_id_of(stdout: str) -> str:
    match = re.search(r"^run (\S+): (succeeded|failed)", stdout, re.M)
    assert match, stdout
    return match.group(1)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    artifacts = tmp_path_factory.mktemp("e2e") / "artifacts"
    result = run_cli("train", "--data", "demo", *tiny_args(artifacts))
    assert result.returncode == 0, result.stderr
    return artifacts, run_id_of(result.stdout), result.stderr


def test_train_prints_run_id_and_summary(first_run: tuple[Path, str, str]) -> None:
    artifacts, run_id, _ = first_run
    manifest = load_manifest(artifacts, run_id)
    assert manifest.status == "succeeded"
    assert manifest.finished_at is not None
    assert set(manifest.stages) >= {"data_ingestion", "data_transformation", "model_trainer", "model_evaluation"}
    assert all(s.status == "succeeded" for s in manifest.stages.values())
    assert manifest.environment["packages"]["torch"].startswith("2.14.1")
    assert manifest.config["trainer"]["epochs"] == 1
    for stage in ("model_evaluation",):
        artifact = json.loads((artifacts / run_id / stage / "artifact.json").read_text())
        assert artifact["header"]["parents"], "evaluation must name what it was made from"
    plots = artifacts / run_id / "model_evaluation"
    for name in ("roc_curves.png", "training_curves.png", "gradcam.png", "confusion_simple_cnn.png", "comparison.md"):
        assert (plots / name).stat().st_size > 0


def test_runs_list_show_and_verify(first_run: tuple[Path, str, str]) -> None:
    artifacts, run_id, _ = first_run
    listing = run_cli("runs", "--artifacts", str(artifacts), "list")
    assert listing.returncode == 0 and run_id in listing.stdout and "succeeded" in listing.stdout
    after = run_cli("runs", "list", "--artifacts", str(artifacts))  # the option after the subcommand too
    assert after.returncode == 0 and after.stdout == listing.stdout
    shown = run_cli("runs", "--artifacts", str(artifacts), "show", run_id, "--json")
    report = json.loads(shown.stdout)
    assert report["chosen_model"] == "simple_cnn"
    metrics = report["candidates"]["simple_cnn"]
    for split in ("validation", "test"):
        assert 0 <= metrics[split]["accuracy"] <= 1
        assert 0 <= metrics[split]["roc_auc"] <= 1
    verify = run_cli("runs", "--artifacts", str(artifacts), "verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "match" in verify.stdout


def test_finished_run_is_read_only(first_run: tuple[Path, str, str]) -> None:
    artifacts, run_id, _ = first_run
    checkpoint = artifacts / run_id / "model_trainer" / "simple_cnn.pt"
    assert not checkpoint.stat().st_mode & stat.S_IWUSR


def test_identical_rerun_reuses_cached_stages(first_run: tuple[Path, str, str]) -> None:
    artifacts, first_id, _ = first_run
    result = run_cli("train", "--data", "demo", *tiny_args(artifacts))
    assert result.returncode == 0, result.stderr
    second_id = run_id_of(result.stdout)
    assert second_id != first_id
    manifest = load_manifest(artifacts, second_id)
    for stage in ("data_transformation", "model_trainer", "model_evaluation"):
        assert manifest.stages[stage].cached_from == first_id
    assert "reused from run" in result.stderr
    assert run_cli("runs", "--artifacts", str(artifacts), "verify", second_id).returncode == 0
    changed = run_cli("train", "--data", "demo", *tiny_args(artifacts, "trainer.learning_rate=0.001"))
    manifest = load_manifest(artifacts, run_id_of(changed.stdout))
    assert manifest.stages["data_transformation"].cached_from == first_id
    assert manifest.stages["model_trainer"].cached_from is None  # trainer config changed: recomputed


def test_verify_names_tampered_and_missing_files(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    run_id = run_id_of(run_cli("train", "--data", "demo", *tiny_args(artifacts)).stdout)
    run_dir = artifacts / run_id
    target = run_dir / "model_trainer" / "simple_cnn.pt"
    target.chmod(0o644)
    with open(target, "ab") as fh:
        fh.write(b"tampered")
    plot = run_dir / "model_evaluation" / "roc_curves.png"
    os.chmod(plot.parent, 0o755)
    plot.unlink()
    result = run_cli("runs", "--artifacts", str(artifacts), "verify", run_id)
    assert result.returncode == 1
    assert "modified: model_trainer/simple_cnn.pt" in result.stdout
    assert "missing: model_evaluation/roc_curves.png" in result.stdout


def assert_clean_error(result, fragment: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("xray: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "trainer.candidates=[resnet9000]"], "unknown candidate 'resnet9000'"),
        (["--set", "trainer.epohcs=2"], "unknown key trainer.epohcs"),
        (["--set", "trainer.batch_size=big"], "trainer.batch_size: expected an integer"),
        (["--config", "/nonexistent/pipeline.yaml"], "config file not found"),
    ],
)
def test_config_errors_exit_2_before_any_run(tmp_path: Path, args: list[str], fragment: str) -> None:
    artifacts = tmp_path / "artifacts"
    result = run_cli("train", "--data", "demo", "--set", f"artifacts_dir={artifacts}", *args)
    assert_clean_error(result, fragment)
    assert list_runs(artifacts) == []


def test_data_errors_leave_a_failed_run_with_the_reason(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    single = class_folder(tmp_path / "single", {"normal": 12})
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"garbage")
    cases = [(tmp_path / "does-not-exist", "data source not found"), (single, "only one class"), (corrupt, "not a readable .npz")]
    for uri, fragment in cases:
        result = run_cli("train", "--data", str(uri), *tiny_args(artifacts))
        assert_clean_error(result, fragment)
        manifest = load_manifest(artifacts, run_id_of(result.stdout))
        assert manifest.status == "failed"
        assert fragment in (manifest.reason or "")
        assert all(s.status != "running" for s in manifest.stages.values())
    assert [m.status for m in list_runs(artifacts)] == ["failed"] * 3


def test_runs_show_unknown_run(tmp_path: Path) -> None:
    assert_clean_error(run_cli("runs", "--artifacts", str(tmp_path), "show", "no-such-run"), "no run 'no-such-run'")
    assert_clean_error(run_cli("runs", "--artifacts", str(tmp_path), "verify", "../etc"), "not a run id")
