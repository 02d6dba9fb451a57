"""Tracking: MLflow export, the production pointer with its audit log, run diff, CLI polish, air-gapped moves.

One module-scoped store holds two tiny pushed runs that differ in ``trainer.seed``:
A (pushed first) and B (pushed after it without comparing, so B is production).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.app_helpers import READ_TOKEN, new_server
from tests.conftest import REPO, run_cli, tiny_args, wait_until_ready
from tests.serving_fixtures import free_port, start_bento_server, stop_process_group
from xray.audit.seal import verify_run

MODEL = "xray-classifier"


@dataclass(frozen=True)
class Store:
    root: Path
    home: Path  # BENTOML_HOME
    artifacts: Path
    run_a: str
    run_b: str
    tag_a: str
    tag_b: str

    @property
    def env(self) -> dict[str, str]:
        return {"BENTOML_HOME": str(self.home), "MLFLOW_DISABLE_TELEMETRY": "true"}

    def cli(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return run_cli(*args, env=self.env, timeout=timeout)


def _pushed(result: subprocess.CompletedProcess) -> tuple[str, str]:
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split()[1].rstrip(":")
    tag = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("model: pushed as"))
    return run_id, tag


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("tracking")
    home, artifacts = root / "bentoml", root / "artifacts"
    env = {"BENTOML_HOME": str(home)}
    run_a, tag_a = _pushed(run_cli("train", *tiny_args(artifacts), env=env))
    # Several pairs after one --set, and -q after the subcommand (the README's form).
    b = run_cli("train", *tiny_args(artifacts), "--set", "trainer.seed=3", "gate.compare_with_production=false",
                "-q", env=env)
    run_b, tag_b = _pushed(b)
    assert " INFO " not in b.stderr, "-q after the subcommand must silence INFO logs"
    return Store(root, home, artifacts, run_a, run_b, tag_a, tag_b)


def _manifest_config(store: Store, run_id: str) -> dict:
    return json.loads((store.artifacts / run_id / "manifest.json").read_text())["config"]


def _audit(store: Store) -> list[dict]:
    path = store.home / "xray" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _test_images(store: Store, run_id: str) -> list[Path]:
    """The demo films of the run's test split, as ingested (the snapshot keeps the originals)."""
    run = store.artifacts / run_id
    rows = [json.loads(line) for line in (run / "data_transformation" / "splits.jsonl").read_text().splitlines()]
    return [run / "data_ingestion" / "snapshot" / r["ref"] for r in rows if r["split"] == "test"]


# ------------------------------------------------------------------ CLI polish


def test_set_takes_several_pairs_and_quiet_goes_after_the_subcommand(store: Store) -> None:
    config = _manifest_config(store, store.run_b)
    assert config["trainer"]["seed"] == 3
    assert config["gate"]["compare_with_production"] is False
    assert _manifest_config(store, store.run_a)["trainer"]["seed"] == 0


def test_version_and_one_line_usage_errors() -> None:
    from xray import __version__

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"xray {__version__}"
    for args in (["train", "--no-such-flag"], ["models", "promote", "x:1"], ["runs", "diff", "only-one"], []):
        result = run_cli(*args)
        assert result.returncode == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xray: error:"), (args, result.stderr)


# ------------------------------------------------------------------ production pointer


def test_gate_writes_the_audit_log_and_models_list_marks_production(store: Store) -> None:
    entries = _audit(store)
    assert [(e["action"], e["from_tag"], e["to_tag"]) for e in entries] == [
        ("gate", None, store.tag_a), ("gate", store.tag_a, store.tag_b),
    ]
    assert all(e["who"] and e["when"] and store.run_a in entries[0]["reason"] for e in entries)
    listed = store.cli("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["tag"]: row for row in json.loads(listed.stdout)}
    assert rows[store.tag_b]["production"] and not rows[store.tag_a]["production"]
    assert rows[store.tag_a]["run_id"] == store.run_a and rows[store.tag_a]["gate_passed"]
    assert isinstance(rows[store.tag_a]["test_roc_auc"], float)
    text = store.cli("models", "list")
    assert f"* {store.tag_b}" in text.stdout


def test_bad_promotions_and_rollbacks_are_one_line_errors(store: Store, tmp_path: Path) -> None:
    ungated = subprocess.run(
        [sys.executable, "-c", (
            "import bentoml\n"
            f"with bentoml.models.create({MODEL!r}, labels={{}}, metadata={{}}) as m:\n"
            "    open(m.path + '/weights.pt', 'w').write('not gated')\n"
            "print(m.tag)"
        )],
        env={**os.environ, **store.env}, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()
    before = _audit(store)
    cases = {
        ("models", "promote", ungated, "--reason", "try"): "never passed the gate",
        ("models", "promote", f"{MODEL}:nosuchversion", "--reason", "try"): "no model",
        ("models", "promote", store.tag_a, "--reason", "  "): "needs a --reason",
        ("models", "promote", store.tag_b, "--reason", "again"): "already production",
    }
    for args, message in cases.items():
        result = store.cli(*args)
        assert result.returncode == 2, (args, result.stdout)
        errors = [line for line in result.stderr.splitlines() if line.startswith("xray: error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr)
    assert _audit(store) == before, "a refused change must not be logged"
    fresh = run_cli("models", "rollback", "--reason", "x", env={"BENTOML_HOME": str(tmp_path / "empty")})
    assert fresh.returncode == 2 and "nothing to roll back to" in fresh.stderr
    subprocess.run([str(Path(sys.executable).with_name("bentoml")), "models", "delete", "-y", ungated],
                   env={**os.environ, **store.env}, capture_output=True, timeout=120, check=True)


def _served_model(store: Store, predict: bool) -> tuple[str, dict[str, str]]:
    """A fresh `bentoml serve` (no XRAY_MODEL_TAG): the model /metadata names, and its label per test image."""
    env = {"XRAY_MODEL_WORKERS": "1", "XRAY_MODEL_TAG": ""}
    server = start_bento_server(store.home, store.root / f"serve-{len(os.listdir(store.root))}.log", env)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            tag = http.get("/metadata").json()["model"]
            labels = {}
            for path in _test_images(store, store.run_b) if predict else ():
                answer = http.post("/predict", files={"image": (path.name, path.read_bytes())})
                assert answer.status_code in (200, 422), answer.text
                body = answer.json()  # a refusal is an answer too: the pyfunc must give the same one
                labels[path.name] = "refused" if body["refused"] else body["label"]
        return tag, labels
    finally:
        stop_process_group(server.process)


@dataclass(frozen=True)
class Served:
    after_promote: str  # the model a fresh `bentoml serve` named in /metadata after `models promote A`
    after_rollback: str  # ... and after `models rollback`
    labels: dict[str, str]  # what it answered after the rollback, per demo test image


@pytest.fixture(scope="module")
def served(store: Store) -> Served:
    """Promote A over B, serve; roll back to B, serve: two fresh `bentoml serve` starts."""
    promoted = store.cli("models", "promote", store.tag_a, "--reason", "B misreads portable films")
    assert promoted.returncode == 0, promoted.stderr
    after_promote, _ = _served_model(store, predict=False)
    rolled = store.cli("models", "rollback", "--reason", "films fixed upstream")
    assert rolled.returncode == 0, rolled.stderr
    after_rollback, labels = _served_model(store, predict=True)
    return Served(after_promote, after_rollback, labels)


@pytest.fixture(scope="module")
def sqlite_export(store: Store) -> tuple[str, list[subprocess.CompletedProcess]]:
    uri = f"sqlite:///{store.root / 'mlflow.db'}"
    results = [store.cli("runs", "export", store.run_b, "--artifacts", str(store.artifacts), "--mlflow", uri)
               for _ in range(2)]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return uri, results


def test_exported_twice_to_sqlite_is_one_run_with_steps_artifacts_and_champion(store: Store, sqlite_export) -> None:
    from mlflow import MlflowClient

    uri, results = sqlite_export
    assert "created MLflow run" in results[0].stdout and "updated MLflow run" in results[1].stdout
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("xray")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`xray.run_id` = '{store.run_b}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.seed"] == "3" and run.data.params["push.model_name"] == MODEL
    sealed = verify_run(store.artifacts, store.run_b)
    assert sealed.ok and sealed.seal_digest is not None and len(sealed.seal_digest) == 64
    assert run.data.tags["xray.status"] == "succeeded" and run.data.tags["xray.audit.seal"] == sealed.seal_digest
    manifest = json.loads((store.artifacts / store.run_b / "manifest.json").read_text())
    assert run.data.tags["mlflow.source.git.commit"] == (manifest["code"]["git_commit"] or "")
    history = client.get_metric_history(run.info.run_id, "simple_cnn/val_loss")
    trainer = json.loads((store.artifacts / store.run_b / "model_trainer" / "artifact.json").read_text())
    epochs = [e["epoch"] for e in trainer["candidates"][0]["history"]]
    assert sorted(m.step for m in history) == epochs, "one point per epoch, none duplicated by the second export"
    assert "simple_cnn/test/roc_auc" in run.data.metrics
    [dataset] = run.inputs.dataset_inputs
    fingerprint = json.loads((store.artifacts / store.run_b / "data_ingestion" / "artifact.json").read_text())[
        "data_fingerprint"]
    assert {t.key: t.value for t in dataset.tags}["fingerprint"] == fingerprint
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "run.log", "model_pusher", "model_trainer"} <= top
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    assert client.get_model_version_by_alias(MODEL, "champion").version == versions[0].version


def test_mlflow_model_agrees_with_the_bento(
    store: Store, sqlite_export, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc
    import pandas as pd

    uri, _ = sqlite_export
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = _test_images(store, store.run_b)
    predicted = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    answers = ["refused" if refused else label for label, refused in zip(predicted["label"], predicted["refused"])]
    assert dict(zip([p.name for p in images], answers)) == served.labels
    assert predicted["ood_threshold"].notna().all(), "the exported model carries its OOD gate"
    assert len(served.labels) >= 3


def test_export_to_a_real_mlflow_server(store: Store) -> None:
    from mlflow import MlflowClient

    port = free_port()
    log = store.root / "mlflow-server.log"
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store.root / 'server.db'}",
        "--artifacts-destination", str(store.root / "server-artifacts"), "--workers", "1",
    ]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until_ready(server, f"{url}/health", 300, lambda: log.read_text()[-3000:]), log.read_text()[-3000:]
        result = store.cli("runs", "export", store.run_a, "--artifacts", str(store.artifacts), "--mlflow", url)
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        [run] = client.search_runs([client.get_experiment_by_name("xray").experiment_id])
        assert run.data.tags["xray.run_id"] == store.run_a and run.data.params["trainer.seed"] == "0"
        assert "manifest.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert client.get_model_version_by_alias(MODEL, "champion").run_id == run.info.run_id
        assert (store.root / "server-artifacts").is_dir(), "artifacts go through the server to its destination"
    finally:
        stop_process_group(server)


def test_export_bad_input_is_one_line(store: Store) -> None:
    cases = {
        ("runs", "export", "no-such-run", "--artifacts", str(store.artifacts), "--mlflow", "sqlite:///x.db"): "no run",
        ("runs", "export", store.run_a, "--artifacts", str(store.artifacts), "--mlflow", "ftp://host/x"): "--mlflow",
    }
    for args, message in cases.items():
        result = store.cli(*args)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("xray: error:")
        assert message in result.stderr.strip().splitlines()[-1]


def test_promote_and_rollback_change_what_a_fresh_bento_serves(store: Store, served: Served) -> None:
    assert (served.after_promote, served.after_rollback) == (store.tag_a, store.tag_b)
    tail = [(e["action"], e["from_tag"], e["to_tag"], e["reason"]) for e in _audit(store)[-2:]]
    assert tail == [
        ("promote", store.tag_b, store.tag_a, "B misreads portable films"),
        ("rollback", store.tag_a, store.tag_b, "films fixed upstream"),
    ]


# ------------------------------------------------------------------ run diff


def test_runs_diff_names_the_changed_seed(store: Store) -> None:
    text = store.cli("runs", "diff", store.run_a, store.run_b, "--artifacts", str(store.artifacts))
    assert text.returncode == 0, text.stderr
    assert "trainer.seed: 0 -> 3" in text.stdout and "data fingerprint: same" in text.stdout
    as_json = json.loads(store.cli("runs", "diff", store.run_a, store.run_b, "--artifacts", str(store.artifacts),
                                   "--json").stdout)
    changed = {c["key"]: (c["a"], c["b"]) for c in as_json["config_changes"]}
    assert changed == {"trainer.seed": (0, 3), "gate.compare_with_production": (True, False)}
    assert as_json["same_data"] and as_json["same_code"]
    deltas = {(m["candidate"], m["split"], m["metric"]): m for m in as_json["metrics"]}
    test_auc = deltas[("simple_cnn", "test", "roc_auc")]
    assert test_auc["delta"] == pytest.approx(test_auc["b"] - test_auc["a"])
    assert as_json["push_a"]["model_tag"] == store.tag_a and as_json["push_b"]["model_tag"] == store.tag_b
    missing = store.cli("runs", "diff", store.run_a, "nope", "--artifacts", str(store.artifacts))
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


@pytest.fixture(scope="module")
def app(store: Store) -> Iterator:
    server = new_server(store.root / "app", XRAY_ARTIFACTS_DIR=str(store.artifacts), BENTOML_HOME=str(store.home))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_app_shows_models_audit_and_diff_to_the_read_role(store: Store, app) -> None:
    with app.client(READ_TOKEN) as http:
        models = http.get("/models")
        assert models.status_code == 200, models.text
        body = models.json()
        assert body["production"] in (store.tag_a, store.tag_b)
        assert [e["action"] for e in body["audit"]][:2] == ["gate", "gate"]
        assert {v["tag"] for v in body["versions"]} >= {store.tag_a, store.tag_b}
        diff = http.get(f"/runs/{store.run_a}/diff/{store.run_b}")
        assert diff.status_code == 200 and "trainer.seed" in {c["key"] for c in diff.json()["config_changes"]}
        assert http.get(f"/runs/{store.run_a}/diff/nope").status_code == 404
    with app.client(None) as anonymous:
        assert anonymous.get("/models").status_code == 401
    with httpx.Client(base_url=app.url, cookies={"xray_token": READ_TOKEN}, timeout=30) as browser:
        page = browser.get("/ui/diff", params={"a": store.run_a, "b": store.run_b})
        assert page.status_code == 200 and "trainer.seed" in page.text and "compare_with_production" in page.text
        models_page = browser.get("/ui/models")
        assert models_page.status_code == 200
        assert store.tag_a in models_page.text and "gate" in models_page.text
        assert browser.get("/ui/diff", params={"a": store.run_a, "b": "nope"}).status_code == 404


# ------------------------------------------------------------------ air-gapped moves


def test_bentoml_export_import_round_trip_with_audit_log(store: Store, tmp_path: Path) -> None:
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    archive = tmp_path / "model.bentomodel"
    fresh = tmp_path / "fresh-home"
    base = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([bentoml, "models", "export", store.tag_a, str(archive)], env={**base, **store.env},
                   check=True, capture_output=True, timeout=120)
    subprocess.run([bentoml, "models", "import", str(archive)], env={**base, "BENTOML_HOME": str(fresh)},
                   check=True, capture_output=True, timeout=120)

    def described(home: Path) -> tuple[dict, str, dict]:
        info = subprocess.run([bentoml, "models", "get", store.tag_a, "-o", "json"], env={**base, "BENTOML_HOME": str(home)},
                              check=True, capture_output=True, text=True, timeout=120)
        path = home / "models" / MODEL / store.tag_a.split(":")[1]
        weights = hashlib.sha256((path / "weights.pt").read_bytes()).hexdigest()
        return json.loads(info.stdout)["metadata"], weights, json.loads((path / "model.json").read_text())

    original, imported = described(store.home), described(fresh)
    assert original == imported
    assert imported[1] == imported[0]["weights_sha256"]
    (fresh / "xray").mkdir()
    (fresh / "xray" / "audit.jsonl").write_bytes((store.home / "xray" / "audit.jsonl").read_bytes())
    listed = run_cli("models", "list", "--json", env={"BENTOML_HOME": str(fresh)})
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["tag"] == store.tag_a and row["gate_passed"]
