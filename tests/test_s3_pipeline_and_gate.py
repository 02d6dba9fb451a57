"""`xray train --data s3://…` against a real SeaweedFS, then the gate and the push to BentoML."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.s3_fixtures import ACCESS_KEY, SECRET_KEY, TEST_BUCKET, requires_weed, seaweed_server  # noqa: F401
from xray.data.sources.s3 import S3Settings, upload_dir
from xray.pipeline.store import load_manifest, load_stage_artifact, sha256_file

from .conftest import run_cli, tiny_args
from . import dicom_builders as dcm
from .data_builders import class_folder, pattern
from .test_pipeline import run_id_of

pytestmark = [requires_weed, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def s3_dataset(seaweed_server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:  # noqa: F811
    """An easily learnable two-class folder (PNG + DICOM films) uploaded to the test bucket; returns (uri, env)."""
    local = class_folder(tmp_path_factory.mktemp("upload") / "data", {"normal": 24, "pneumonia": 24})
    for c, name in enumerate(("normal", "pneumonia")):
        for i in range(4):
            dcm.write(local / name / f"{name}_film{i}.dcm", dcm.uncompressed(pattern(c, 100 + i), 12, "MONOCHROME1"))
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": seaweed_server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        count = upload_dir(local, f"s3://{TEST_BUCKET}/bands", S3Settings(endpoint_url=seaweed_server.endpoint_url))
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert count == 56
    return f"s3://{TEST_BUCKET}/bands", env


def train(artifacts: Path, uri: str, env: dict[str, str], *extra: str):
    result = run_cli("train", "--data", uri, *tiny_args(artifacts, *extra), env=env)
    return result, run_id_of(result.stdout)


def test_s3_training_records_objects_pushes_and_gates(s3_dataset, tmp_path: Path) -> None:
    uri, env = s3_dataset
    env = {**env, "BENTOML_HOME": str(tmp_path / "bentoml")}
    artifacts = tmp_path / "artifacts"
    good = ("trainer.epochs=4", "trainer.learning_rate=0.003")

    first, first_id = train(artifacts, uri, env, *good)
    assert first.returncode == 0, first.stderr
    manifest = load_manifest(artifacts, first_id)
    ingestion = load_stage_artifact(artifacts, manifest, "data_ingestion")
    assert ingestion.source_kind == "s3" and len(ingestion.s3_objects) == 56
    assert ingestion.dicom_images == 8 and ingestion.num_images == 56
    assert all(len(o.sha256) == 64 and o.etag and o.size > 0 for o in ingestion.s3_objects)
    pusher = load_stage_artifact(artifacts, manifest, "model_pusher")
    assert pusher.pushed and pusher.model_tag.startswith("xray-classifier:")
    assert pusher.production_before is None
    stored = tmp_path / "bentoml" / "models" / "xray-classifier" / pusher.model_tag.split(":")[1]
    spec = json.loads((stored / "model.json").read_text())
    assert sha256_file(stored / "weights.pt") == spec["weights_sha256"]  # the checkpoint, byte for byte
    card = json.loads((stored / "model_card.json").read_text())  # the model card travels with the model
    assert card["model_parameters"]["data"][0]["dicom_images"] == 8
    assert spec["weights_sha256"] == sha256_file(artifacts / first_id / "model_trainer" / f"{spec['architecture']}.pt")
    assert run_cli("runs", "--artifacts", str(artifacts), "verify", first_id).returncode == 0

    # The same data again: nothing downloaded, transformation reused, and the gate compares with production.
    second, second_id = train(artifacts, uri, env, *good)
    assert second.returncode == 0, second.stderr
    assert "downloaded 0" in second.stderr
    manifest = load_manifest(artifacts, second_id)
    assert manifest.stages["data_transformation"].cached_from == first_id
    pusher2 = load_stage_artifact(artifacts, manifest, "model_pusher")
    assert pusher2.production_before == pusher.model_tag
    assert pusher2.production_score == pytest.approx(pusher2.candidate_score)  # same weights, re-scored
    assert pusher2.pushed  # "at least as good" admits a tie

    # A threshold a barely trained model cannot meet (a perfect test AUC; thresholds above 1 are refused
    # as out of range): not pushed, and the artifact says why.
    barely = ("trainer.epochs=1", "trainer.learning_rate=0.0000001", "trainer.seed=3")
    strict, strict_id = train(artifacts, uri, env, *barely, "gate.min_roc_auc=1", "gate.compare_with_production=false")
    assert strict.returncode == 0, strict.stderr
    decision = load_stage_artifact(artifacts, load_manifest(artifacts, strict_id), "model_pusher")
    assert not decision.pushed and decision.model_tag is None
    assert decision.candidate_score < 1
    assert any("below gate.min_roc_auc 1" in r for r in decision.reasons)

    # A barely trained model is worse than production re-scored on the same test split: not pushed.
    worse, worse_id = train(artifacts, uri, env, *barely)
    assert worse.returncode == 0, worse.stderr
    decision = load_stage_artifact(artifacts, load_manifest(artifacts, worse_id), "model_pusher")
    assert not decision.pushed
    assert decision.production_before is not None
    assert decision.candidate_score < decision.production_score
    assert any("below production" in r for r in decision.reasons)
    record = json.loads((artifacts / worse_id / "model_pusher" / "decision.json").read_text())
    assert record["pushed"] is False and record["reasons"] == list(decision.reasons)


def test_s3_errors_fail_the_run_cleanly(s3_dataset, tmp_path: Path) -> None:
    uri, env = s3_dataset
    artifacts = tmp_path / "artifacts"
    cases = [
        (f"s3://no-such-bucket-{os.getpid()}/x", env, "does not exist"),
        (uri, {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, "credentials"),
        (f"s3://{TEST_BUCKET}/empty-prefix", env, "no objects under"),
    ]
    for bad_uri, bad_env, fragment in cases:
        result, run_id = train(artifacts, bad_uri, bad_env)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert fragment in result.stderr.lower() or fragment in result.stderr
        manifest = load_manifest(artifacts, run_id)
        assert manifest.status == "failed" and manifest.reason


def test_push_is_atomic_when_the_s3_copy_fails(s3_dataset, tmp_path: Path) -> None:
    """S3 first, the store last: a push whose S3 copy fails leaves the store and `latest` as they were."""
    _, env = s3_dataset
    bentoml_home = tmp_path / "bentoml"
    env = {**env, "BENTOML_HOME": str(bentoml_home)}
    artifacts = tmp_path / "artifacts"
    models = bentoml_home / "models" / "xray-classifier"

    first = run_cli("train", "--data", "demo", *tiny_args(artifacts, f"push.s3_uri=s3://{TEST_BUCKET}/models"), env=env)
    assert first.returncode == 0, first.stderr
    pusher = load_stage_artifact(artifacts, load_manifest(artifacts, run_id_of(first.stdout)), "model_pusher")
    assert pusher.pushed and len(pusher.s3_uris) == 4  # weights, comparison, model card, report
    assert any(uri.endswith("/model_card.json") for uri in pusher.s3_uris)
    before = {p.name: sha256_file(p) if p.is_file() else None for p in models.iterdir()}
    latest = (models / "latest").read_text()

    # The same run (stages reused from the cache) pushing to a bucket that does not exist.
    missing_bucket = "push.s3_uri=s3://no-such-bucket-xray/models"
    failed = run_cli("train", "--data", "demo", *tiny_args(artifacts, missing_bucket), env=env)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr
    run_id = run_id_of(failed.stdout)
    manifest = load_manifest(artifacts, run_id)
    assert manifest.status == "failed"
    assert "model not added to the store: S3 copy to s3://no-such-bucket-xray/models/" in manifest.reason
    assert {p.name: sha256_file(p) if p.is_file() else None for p in models.iterdir()} == before
    assert (models / "latest").read_text() == latest
    # The failed run is sealed too, evidence seal included, and verifies intact.
    verify = run_cli("runs", "--artifacts", str(artifacts), "verify", run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "evidence sealed before the push" in verify.stdout
