"""Sealed, signed runs: the tamper matrix against `xray runs verify`, the ledger, the key, serving's weight check.

One real tiny run is trained once per module through the app's worker (so it has a
worker.log and a pushed model) and copied per case, so each case costs one `xray runs verify`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from xray.api.jobs import JobManager
from xray.api.settings import AppSettings, Tokens
from xray.audit.ledger import LEDGER, canonical
from xray.audit.seal import EVIDENCE_SEAL, SEAL, mark_orphaned
from xray.pipeline.store import RunDir, load_manifest

from .conftest import REPO, TINY, run_cli

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class SealedRuns:
    root: Path
    run_id: str  # trained through the app's worker, pushed
    orphan_id: str  # queued, then found orphaned: sealed as failed without training
    bentoml_home: Path


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> SealedRuns:
    home = tmp_path_factory.mktemp("sealed")
    root = home / "artifacts"
    bentoml_home = home / "bentoml"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTOML_HOME", str(bentoml_home))
        jobs = JobManager(AppSettings(artifacts_dir=root, config_path=None, tokens=Tokens(), workdir=REPO))
        overrides = list(TINY)
        manifest = jobs.start(jobs.validate("demo", overrides, admin=True), overrides)  # tiny config: admin-only keys
        assert jobs.wait_idle(300), "the training worker did not finish"
    finished = load_manifest(root, manifest.run_id)
    assert finished.status == "succeeded", finished.reason
    orphan = RunDir.queue(root, {}, "demo", pid=2**22 + 1)
    assert mark_orphaned(root, orphan.run_id, "worker process is gone (test)").status == "failed"
    return SealedRuns(root, manifest.run_id, orphan.run_id, bentoml_home)


def copy_root(sealed: SealedRuns, dest: Path) -> Path:
    """A writable copy of the artifacts root (runs are read-only), links copied as links."""
    root = dest / "artifacts"
    shutil.copytree(sealed.root, root, symlinks=True)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return root


def verify(root: Path, run_id: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("runs", "--artifacts", str(root), "verify", run_id, *extra, timeout=60)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the tampering, one function per case


def status_edited(run: Path, outside: Path) -> str:
    edit_json(run / "manifest.json", lambda m: m.update(status="failed", reason="edited"))
    return "modified: manifest.json"


def config_edited(run: Path, outside: Path) -> str:
    edit_json(run / "manifest.json", lambda m: m["config"]["gate"].update(min_roc_auc=0.99))
    return "modified: manifest.json"


def run_log_appended(run: Path, outside: Path) -> str:
    append(run / "run.log", "INFO all good\n")
    return "modified: run.log"


def worker_log_appended(run: Path, outside: Path) -> str:
    append(run / "worker.log", "appended later\n")
    return "modified: worker.log"


def file_added(run: Path, outside: Path) -> str:
    (run / "model_evaluation" / "notes.txt").write_text("added after the seal")
    return "added: model_evaluation/notes.txt (not in the seal)"


def file_deleted(run: Path, outside: Path) -> str:
    (run / "model_evaluation" / "roc_curves.png").unlink()
    return "missing: model_evaluation/roc_curves.png"


def file_swapped_for_symlink(run: Path, outside: Path) -> str:
    """The same bytes, but from outside the run: a later edit there would change the run."""
    checkpoint = run / "model_trainer" / "simple_cnn.pt"
    shutil.copyfile(checkpoint, outside / "simple_cnn.pt")
    checkpoint.unlink()
    checkpoint.symlink_to(outside / "simple_cnn.pt")
    return f"symlink: model_trainer/simple_cnn.pt -> {outside / 'simple_cnn.pt'} (points outside the run)"


def folder_swapped_for_symlink(run: Path, outside: Path) -> str:
    shutil.copytree(run / "model_evaluation", outside / "model_evaluation")
    shutil.rmtree(run / "model_evaluation")
    (run / "model_evaluation").symlink_to(outside / "model_evaluation")
    return "symlink: model_evaluation ->"


def recorded_hashes_forged(run: Path, outside: Path) -> str:
    """Change the checkpoint, then rewrite every sha256 the run records for it (artifact and manifest)."""
    checkpoint = run / "model_trainer" / "simple_cnn.pt"
    append(checkpoint, "backdoor")
    artifact = run / "model_trainer" / "artifact.json"

    def rewrite(data: dict) -> None:
        for item in data["header"]["files"]:
            if item["path"] == "model_trainer/simple_cnn.pt":
                item.update(sha256=sha256(checkpoint), size=checkpoint.stat().st_size)

    edit_json(artifact, rewrite)
    edit_json(run / "manifest.json", lambda m: m["stages"]["model_trainer"].update(artifact_sha256=sha256(artifact)))
    return "modified: model_trainer/simple_cnn.pt (sha256 differs from the seal)"


def seal_hashes_forged(run: Path, outside: Path) -> str:
    """Change the checkpoint and rewrite its entry in seal.json itself: the signature no longer fits."""
    checkpoint = run / "model_trainer" / "simple_cnn.pt"
    append(checkpoint, "backdoor")

    def rewrite(data: dict) -> None:
        for item in data["body"]["files"]:
            if item["path"] == "model_trainer/simple_cnn.pt":
                item.update(sha256=sha256(checkpoint), size=checkpoint.stat().st_size)

    edit_json(run / SEAL, rewrite)
    return "seal: invalid signature"


def resealed_with_own_key(run: Path, outside: Path) -> str:
    """A forger with write access but not the key re-signs the edited seal with a key of their own."""
    attacker = Ed25519PrivateKey.generate()
    raw = attacker.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    import hashlib

    seal = json.loads((run / SEAL).read_text())
    seal["body"]["status"] = "succeeded"
    seal["body"]["key_id"] = hashlib.sha256(raw).hexdigest()
    seal["signature"] = base64.b64encode(attacker.sign(canonical(seal["body"]))).decode()
    (run / SEAL).write_text(json.dumps(seal))
    return "seal: signed by another key"


def seal_deleted(run: Path, outside: Path) -> str:
    (run / SEAL).unlink()
    return f"missing: {SEAL} (the ledger records a final seal of this run"


def evidence_seal_edited(run: Path, outside: Path) -> str:
    edit_json(run / EVIDENCE_SEAL, lambda s: s["body"].update(run_id="someone-else"))
    return f"modified: {EVIDENCE_SEAL}"


def artifact_path_escapes(run: Path, outside: Path) -> str:
    """An artifact now names a FIFO outside the run: a verify that followed it would hang, not answer."""
    os.mkfifo(outside / "fifo")
    target = os.path.relpath(outside / "fifo", run)

    def rewrite(data: dict) -> None:
        data["header"]["files"][0]["path"] = target

    edit_json(run / "data_ingestion" / "artifact.json", rewrite)
    return "modified: data_ingestion/artifact.json"


def ledger_entry_edited(run: Path, outside: Path) -> str:
    ledger = run.parent / LEDGER
    lines = ledger.read_text().splitlines()
    for i, line in enumerate(lines):
        entry = json.loads(line)
        if entry["run_id"] == run.name and entry["kind"] == "final":
            entry["seal_digest"] = "0" * 64
            lines[i] = json.dumps(entry)
    ledger.write_text("\n".join(lines) + "\n")
    return "was edited: its hash does not match its fields"


def ledger_truncated(run: Path, outside: Path) -> str:
    ledger = run.parent / LEDGER
    kept = [line for line in ledger.read_text().splitlines() if json.loads(line)["run_id"] != run.name]
    ledger.write_text("\n".join(kept) + "\n")
    return "ledger: no final seal of this run"


def run_replaced_by_another(run: Path, outside: Path) -> str:
    """The directory now holds another sealed run (the orphan), renamed."""
    other = next(p for p in run.parent.iterdir() if p.is_dir() and not p.name.startswith(".") and p != run)
    shutil.rmtree(run)
    shutil.copytree(other, run)
    return f"not for {run.name} (a run directory was replaced)"


def run_deleted(run: Path, outside: Path) -> str:
    shutil.rmtree(run)
    return "the run directory is missing; the ledger records its seal"


CASES = [
    status_edited, config_edited, run_log_appended, worker_log_appended, file_added, file_deleted,
    file_swapped_for_symlink, folder_swapped_for_symlink, recorded_hashes_forged, seal_hashes_forged,
    resealed_with_own_key, seal_deleted, evidence_seal_edited, artifact_path_escapes, ledger_entry_edited,
    ledger_truncated, run_replaced_by_another, run_deleted,
]


@pytest.mark.parametrize("tamper", CASES, ids=[c.__name__ for c in CASES])
def test_tampering_is_caught_and_named(sealed: SealedRuns, tmp_path: Path, tamper) -> None:
    root = copy_root(sealed, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    expected = tamper(root / sealed.run_id, outside)
    result = verify(root, sealed.run_id)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert expected in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    assert "do not trust this run" in result.stderr


def test_untouched_runs_verify(sealed: SealedRuns, tmp_path: Path) -> None:
    for run_id in (sealed.run_id, sealed.orphan_id):
        result = verify(sealed.root, run_id)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "signature and ledger entry valid" in result.stdout
    copied = copy_root(sealed, tmp_path)  # the copy the matrix starts from is intact too
    assert verify(copied, sealed.run_id).returncode == 0


def test_seal_covers_every_file_and_the_worker_log(sealed: SealedRuns) -> None:
    run = sealed.root / sealed.run_id
    body = json.loads((run / SEAL).read_text())["body"]
    on_disk = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != SEAL)
    assert [f["path"] for f in body["files"]] == on_disk
    assert "worker.log" in on_disk and "run.log" in on_disk
    assert body["status"] == "succeeded" and body["problems_at_seal"] == []
    orphan = json.loads((sealed.root / sealed.orphan_id / SEAL).read_text())["body"]
    assert orphan["status"] == "failed"


def test_pushed_model_names_the_evidence_seal(sealed: SealedRuns) -> None:
    """An auditor goes from the model's metadata to the run: same run id, same evidence seal, same weights."""
    result = verify(sealed.root, sealed.run_id)
    assert result.returncode == 0
    versions = [p for p in (sealed.bentoml_home / "models" / "xray-classifier").iterdir() if p.name != "latest"]
    assert len(versions) == 1
    import yaml

    metadata = yaml.safe_load((versions[0] / "model.yaml").read_text())["metadata"]
    assert metadata["run_id"] == sealed.run_id
    assert f"evidence sealed before the push: {metadata['seal_digest']}" in result.stdout
    evidence = json.loads((sealed.root / sealed.run_id / EVIDENCE_SEAL).read_text())["body"]
    checkpoint = next(f for f in evidence["files"] if f["path"] == "model_trainer/simple_cnn.pt")
    assert checkpoint["sha256"] == metadata["weights_sha256"]
    decision = json.loads((sealed.root / sealed.run_id / "model_pusher" / "decision.json").read_text())
    assert decision["evidence_seal"] == metadata["seal_digest"]


def test_running_run_is_not_sealed_yet(sealed: SealedRuns, tmp_path: Path) -> None:
    root = copy_root(sealed, tmp_path)
    running = RunDir.create(root, {}, "demo")
    result = verify(root, running.run_id)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "is running: not sealed yet" in result.stdout
    assert "problem" not in result.stdout + result.stderr


def test_verify_with_exported_public_key(sealed: SealedRuns, tmp_path: Path) -> None:
    public = tmp_path / "xray.pub"
    exported = run_cli("keys", "export", "--out", str(public))
    assert exported.returncode == 0, exported.stderr
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    printed = run_cli("keys", "export")
    assert printed.stdout == public.read_text()
    no_local_key = {"XRAY_KEYS_DIR": str(tmp_path / "empty-keys")}  # an auditor's machine: only the public key
    result = run_cli("runs", "--artifacts", str(sealed.root), "verify", sealed.run_id, "--public-key", str(public),
                     env=no_local_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "empty-keys").exists()  # verifying never creates a key

    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    wrong = verify(sealed.root, sealed.run_id, "--public-key", str(other))
    assert wrong.returncode == 1 and "seal: signed by another key" in wrong.stdout


def test_key_is_private_and_bad_keys_are_one_line_errors(signing_keys_dir: Path, tmp_path: Path) -> None:
    key = signing_keys_dir / "signing_key.pem"
    assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = [
        (run_cli("runs", "--artifacts", str(tmp_path), "verify", "x", "--public-key", str(not_pem)),
         "is not a PEM public key"),
        (run_cli("train", "--data", "demo", "--set", f"artifacts_dir={tmp_path / 'a'}",
                 env={"XRAY_SIGNING_KEY": str(tmp_path / "missing.pem")}), "XRAY_SIGNING_KEY: no such key file"),
        (run_cli("keys", "export", env={"XRAY_SIGNING_KEY": str(not_pem)}), "is not an unencrypted PEM private key"),
        (run_cli("runs", "--artifacts", str(tmp_path), "verify", "no-such-run"), "no run 'no-such-run'"),
    ]
    for result, fragment in cases:
        assert result.returncode == 2, (result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("xray: error:")]
        assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert not (tmp_path / "a").exists()  # no run started without a usable key


def test_serving_refuses_weights_that_differ_from_the_metadata(sealed: SealedRuns, tmp_path: Path) -> None:
    """The loader serving uses (xray/serving/service.py), against a copy of the store with the weights changed."""
    store = tmp_path / "bentoml"
    shutil.copytree(sealed.bentoml_home, store)
    load = ("from xray.serving.serving_model import load_stored_model; "
            "m = load_stored_model('xray-classifier:latest'); print('loaded', m.tag)")

    def run_loader() -> subprocess.CompletedProcess:
        env = {**os.environ, "BENTOML_HOME": str(store), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120)

    intact = run_loader()
    assert intact.returncode == 0 and "loaded xray-classifier:" in intact.stdout, intact.stderr
    version = next(p for p in (store / "models" / "xray-classifier").iterdir() if p.name != "latest")
    weights = version / "weights.pt"
    weights.chmod(0o644)
    append(weights, "tampered")
    refused = run_loader()
    assert refused.returncode != 0
    assert "ModelIntegrityError: refusing model xray-classifier:" in refused.stderr
    assert "weights.pt has sha256" in refused.stderr and "its metadata says" in refused.stderr
