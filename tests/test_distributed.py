"""torchrun with two CPU processes (gloo): one run directory, comparable metrics, and failures that end cleanly.

Metrics are compared on the tests' band-pattern images, which a working
trainer separates in a few epochs (test ROC-AUC near 1) while a broken one
(images and labels mis-sharded, ranks drifting apart) stays near chance; on
the demo phantoms at test sizes both would sit in 0.55-0.8 with 18-image
splits, too noisy to tell the two apart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xray.ports import free_port
from xray.pipeline.store import list_runs, load_manifest, load_stage_artifact

from .conftest import REPO, run_cli, tiny_args
from .data_builders import class_folder
from .test_pipeline import run_id_of

CLASSES = {"covid": 24, "normal": 24, "pneumonia": 24}
# A time budget too: rank 0 plans, every rank must train that one plan (4 epochs fit 10 minutes easily).
COMPARE = ["trainer.epochs=4", "trainer.early_stopping_patience=0", "push.enabled=false", "trainer.time_budget=10m"]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "xray", *args,
    ]


def dist_env() -> dict[str, str]:
    # A hung collective fails after 60 s instead of torch's 30 min: the test would notice a hang, not sit in it.
    return {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "XRAY_DIST_TIMEOUT_S": "60", "XRAY_DIST_SETUP_TIMEOUT_S": "120"}


def run_torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        torchrun_cmd(*args), cwd=REPO, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung past {timeout} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.log"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.fixture(scope="module")
def bands(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return class_folder(tmp_path_factory.mktemp("bands") / "data", CLASSES)


def test_two_ranks_make_one_run_like_a_single_process(tmp_path: Path, bands: Path) -> None:
    single_root, ddp_root = tmp_path / "single", tmp_path / "ddp"
    single = run_cli("train", "--data", str(bands), *tiny_args(single_root, *COMPARE))
    assert single.returncode == 0, single.stderr
    ddp = run_torchrun("train", "--data", str(bands), *tiny_args(ddp_root, *COMPARE))
    assert ddp.returncode == 0, ddp.stderr[-4000:]

    runs = list_runs(ddp_root)
    assert len(runs) == 1, "every rank but 0 must leave the artifacts alone"
    manifest = runs[0]
    assert manifest.status == "succeeded"
    assert ddp.stdout.count("succeeded") == 1, "only rank 0 reports the run"
    assert run_id_of(ddp.stdout) == manifest.run_id
    info = manifest.environment["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo" and len(info["ranks"]) == 2
    assert info["threads_per_rank"] >= 1
    trainer = load_stage_artifact(ddp_root, manifest, "model_trainer")
    assert [c.world_size for c in trainer.candidates] == [2]
    assert len(trainer.candidates[0].history) == 4
    assert trainer.plan is not None and [(c.name, c.planned_epochs) for c in trainer.plan.candidates] == [("simple_cnn", 4)]

    verify = run_cli("runs", "--artifacts", str(ddp_root), "verify", manifest.run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    single_id = run_id_of(single.stdout)
    assert run_files(ddp_root / manifest.run_id) == run_files(single_root / single_id), "same layout as a single process"
    single_manifest = load_manifest(single_root, single_id)
    assert "distributed" not in single_manifest.environment
    assert load_stage_artifact(single_root, single_manifest, "model_trainer").candidates[0].world_size == 1

    one = single_manifest.summary["candidates"]["simple_cnn"]["test"]["roc_auc"]
    two = manifest.summary["candidates"]["simple_cnn"]["test"]["roc_auc"]
    assert one >= 0.9 and two >= 0.9, (one, two)  # chance is 0.5
    assert abs(one - two) <= 0.1, (one, two)


def test_a_killed_rank_fails_the_run_and_leaves_no_process(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    args = tiny_args(artifacts, "trainer.epochs=40", "trainer.early_stopping_patience=0", "push.enabled=false")
    proc = subprocess.Popen(
        torchrun_cmd("train", "--data", "demo", *args), cwd=REPO, env=dist_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        ranks = wait_for_training(artifacts, min_epoch=2, deadline=time.monotonic() + 150)
        os.kill(ranks[1]["pid"], signal.SIGKILL)  # a genuine failure: the process is simply gone
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    [manifest] = list_runs(artifacts)
    assert manifest.status == "failed", manifest
    assert "distributed" in (manifest.reason or "") or "SIGTERM" in (manifest.reason or ""), manifest.reason
    assert all(s.status != "running" for s in manifest.stages.values())
    assert manifest.stages["model_trainer"].status == "failed"
    time.sleep(0.5)
    survivors = [r["pid"] for r in ranks if alive(r["pid"])]
    assert not survivors, f"ranks still alive: {survivors}"


def wait_for_training(artifacts: Path, min_epoch: int, deadline: float) -> list[dict]:
    """The ranks (pid per rank, from the manifest) once rank 0 reports ``min_epoch`` done."""
    while time.monotonic() < deadline:
        manifests = sorted(artifacts.glob("*/manifest.json")) if artifacts.is_dir() else []
        if manifests:
            try:
                manifest = json.loads(manifests[0].read_text())
            except json.JSONDecodeError:
                manifest = {}
            if manifest.get("status") not in (None, "running"):
                pytest.fail(f"run ended before the kill: {manifest.get('status')} {manifest.get('reason')}")
            if manifest.get("progress", {}).get("epoch", 0) >= min_epoch:
                return manifest["environment"]["distributed"]["ranks"]
        time.sleep(0.2)
    pytest.fail("training never reached the epoch to kill at")


def test_rank0_failing_before_training_releases_the_other_rank(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    result = run_torchrun("train", "--data", str(tmp_path / "missing"), *tiny_args(artifacts), timeout=120)
    assert result.returncode != 0
    [manifest] = list_runs(artifacts)
    assert manifest.status == "failed" and "data source not found" in (manifest.reason or "")
    assert result.stderr.count("xray: error:") == 1, "rank 1 was told, not failed"
