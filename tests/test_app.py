"""The training service end to end: a real uvicorn, real worker processes, the real pipeline on demo data.

One server and one tiny trained run are shared by the module; the tests that
need a run of their own (a killed worker, a cancel) start one after it.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.app_helpers import (
    ADMIN_TOKEN,
    READ_TOKEN,
    TINY_OVERRIDES,
    TRAIN_TOKEN,
    AppServer,
    new_server,
    png_bytes,
    start_training,
    wait_for_run,
)
from tests import dicom_builders as dcm
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(300)
WARN_ALL_BUT_FLAT = (
    "ood_score,too_small,posterized,colour,inverted,rotated,dicom_modality,dicom_body_part,dicom_view,dicom_photometric"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # png_bytes() is a blob, not a chest film: every check but nearly_constant answers as a warning here
    app = new_server(tmp_path_factory.mktemp("app"), XRAY_INPUT_GATE_WARN=WARN_ALL_BUT_FLAT).start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def trained(server: AppServer) -> dict:
    """One tiny run through POST /train; the concurrent second POST is recorded for the 409 test."""
    with server.client() as client:
        run_id = start_training(client, TINY_OVERRIDES)
        conflict = client.post("/train", json={"overrides": TINY_OVERRIDES})
        detail = wait_for_run(client, run_id)
    assert detail["status"] == "succeeded", f"{detail['reason']}\n{server.log_tail()}"
    return {"run_id": run_id, "detail": detail, "conflict": conflict}


def run_dirs(server: AppServer) -> set[str]:
    root = server.artifacts
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else set()


def raw_get(server: AppServer, path: str, token: str = READ_TOKEN) -> tuple[int, bytes]:
    """A request whose path goes out exactly as written (no client-side '..' normalisation)."""
    url = urlsplit(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# ---------------------------------------------------------------- training end to end


def test_train_end_to_end(server: AppServer, trained: dict) -> None:
    run_id, detail = trained["run_id"], trained["detail"]
    assert set(detail["stages"]) >= {"data_ingestion", "data_transformation", "model_trainer", "model_evaluation"}
    assert all(s["status"] == "succeeded" for s in detail["stages"].values())
    assert detail["best_candidate"] == "simple_cnn" and "simple_cnn" in detail["candidates"]
    assert 0.0 <= detail["candidates"]["simple_cnn"]["test"]["roc_auc"] <= 1.0
    assert detail["push"] is not None and detail["push"]["reasons"]
    assert detail["plots"] and detail["gradcam"]
    with server.client(READ_TOKEN) as client:
        listed = client.get("/runs").json()
        assert any(r["run_id"] == run_id and r["status"] == "succeeded" for r in listed)
        log = client.get(f"/runs/{run_id}/log", params={"lines": 3})
        assert log.status_code == 200 and 0 < len(log.text.splitlines()) <= 3
        plot = client.get(detail["plots"]["roc_curves"])
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
        manifest = client.get(f"/runs/{run_id}/artifacts/manifest.json")
        assert manifest.status_code == 200 and manifest.json()["status"] == "succeeded"
        verify = client.get(f"/runs/{run_id}/verify").json()
        assert verify["ok"] and verify["sealed"] and verify["checked"] > 5
        assert verify["evidence_digest"] and "signature and ledger entry valid" in verify["message"]
    out = run_cli("runs", "--artifacts", str(server.artifacts), "list", timeout=60)
    assert out.returncode == 0, out.stderr
    assert run_id in out.stdout and "succeeded" in out.stdout


def test_second_train_while_one_runs_is_409(trained: dict) -> None:
    conflict = trained["conflict"]
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["run_id"] == trained["run_id"]
    assert trained["run_id"] in conflict.json()["detail"]


def test_openapi_documents_the_api(server: AppServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {
        "/train",
        "/runs",
        "/runs/{run_id}",
        "/runs/{run_id}/log",
        "/runs/{run_id}/cancel",
        "/runs/{run_id}/artifacts/{path}",
        "/predict",
        "/healthz",
    } <= set(spec["paths"])
    train = spec["paths"]["/train"]["post"]
    assert {"202", "401", "403", "409", "422"} <= set(train["responses"])
    assert "TrainRequest" in json.dumps(train["requestBody"])
    assert not any(p.startswith("/ui") for p in spec["paths"])
    assert httpx.get(f"{server.url}/docs").status_code == 200


# ---------------------------------------------------------------- auth


def test_tokens_and_roles(server: AppServer, trained: dict) -> None:
    run_id = trained["run_id"]
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        missing = anonymous.post("/train", json={})
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.get("/runs").status_code == 401
        assert anonymous.get(f"/runs/{run_id}/artifacts/manifest.json").status_code == 401
        assert anonymous.get("/runs", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    with server.client("not-a-valid-token") as wrong:
        assert wrong.post("/train", json={}).status_code == 401
        assert wrong.get("/runs").status_code == 401
    with server.client(READ_TOKEN) as reader:
        forbidden = reader.post("/train", json={"overrides": TINY_OVERRIDES})
        assert forbidden.status_code == 403 and "train token" in forbidden.json()["detail"]
        assert reader.post(f"/runs/{run_id}/cancel").status_code == 403
        assert reader.get("/runs").status_code == 200
    with server.client(TRAIN_TOKEN) as trainer:
        assert trainer.get(f"/runs/{run_id}").status_code == 200  # train tokens may read
        assert trainer.post(f"/runs/{run_id}/cancel").status_code == 409  # already finished
    assert run_dirs(server) == {trained["run_id"]}


# ---------------------------------------------------------------- artifact paths


def test_artifact_paths_stay_inside_the_run(server: AppServer, trained: dict, tmp_path: Path) -> None:
    run_id = trained["run_id"]
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    run_dir = server.artifacts / run_id
    os.symlink(secret, run_dir / "escape.txt")
    os.symlink(tmp_path, run_dir / "escape-dir")
    attempts = [
        f"/runs/{run_id}/artifacts/../../../../../../etc/passwd",
        f"/runs/{run_id}/artifacts/model_evaluation/../../{run_id}/manifest.json",
        f"/runs/{run_id}/artifacts/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/runs/{run_id}/artifacts/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        f"/runs/{run_id}/artifacts//etc/passwd",
        f"/runs/{run_id}/artifacts/%2Fetc%2Fpasswd",
        f"/runs/{run_id}/artifacts/escape.txt",
        f"/runs/{run_id}/artifacts/escape-dir/secret.txt",
        "/runs/%2e%2e/artifacts/etc/passwd",
        "/runs/..%2F..%2Fetc/artifacts/passwd",
    ]
    for path in attempts:
        status, body = raw_get(server, path)
        assert 400 <= status < 500, (path, status, body[:200])
        assert b"root:" not in body and b"top secret" not in body, path
    status, body = raw_get(server, f"/runs/{run_id}/artifacts/model_trainer/artifact.json")
    assert status == 200 and b"ModelTrainerArtifact" in body


# ---------------------------------------------------------------- bad requests


def test_bad_train_requests_create_no_run(server: AppServer, trained: dict) -> None:
    before = run_dirs(server)
    with server.client() as client:
        cases = [
            client.post("/train", content=b"{not json", headers={"Content-Type": "application/json"}),
            client.post("/train", json={"overrides": ["trainer.no_such_key=1"]}),
            client.post("/train", json={"overrides": ["trainer.epochs=zero"]}),
            client.post("/train", json={"overrides": ["no equals sign"]}),
            client.post("/train", json={"overrides": "trainer.epochs=1"}),
            client.post("/train", json={"surprise": True}),
            client.post("/train", json={"overrides": ["artifacts_dir=/tmp/elsewhere"]}),
        ]
        for response in cases:
            assert response.status_code == 422, response.text
            assert response.json()["detail"]
        assert "no_such_key" in cases[1].json()["detail"]
        missing = client.post("/train", json={"data": "/no/such/dataset", "overrides": TINY_OVERRIDES})
        assert missing.status_code == 403 and "outside the data" in missing.json()["detail"]  # no data roots set
        scheme = client.post("/train", json={"data": "ftp://host/data"})
        assert scheme.status_code == 400
    assert run_dirs(server) == before


# ---------------------------------------------------------------- predict (in-process production model)


def test_app_refuses_what_the_bento_refuses_with_the_same_body(server: AppServer, trained: dict) -> None:
    """In-process fallback: a flat image is 422 with its reasons and the OOD score, on the JSON API and the page."""
    flat = io.BytesIO()
    Image.fromarray(np.full((96, 96), 128, np.uint8)).save(flat, format="PNG")
    with server.client(READ_TOKEN) as client:
        client.timeout = httpx.Timeout(180)
        refused = client.post("/predict", files={"image": ("flat.png", flat.getvalue(), "image/png")})
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert body["refused"] is True and "label" not in body
        assert "nearly_constant" in [r["code"] for r in body["reasons"]]
        assert body["ood_gate"] == "on" and body["ood_score"] is not None and body["ood_threshold"] is not None
        accepted = client.post("/predict", files={"image": ("film.png", png_bytes(), "image/png")}).json()
        assert accepted["ood_gate"] == "on" and accepted["ood_threshold"] == body["ood_threshold"]


def test_predict_json(server: AppServer, trained: dict) -> None:
    with server.client(READ_TOKEN) as client:
        client.timeout = httpx.Timeout(180)  # the first prediction loads torch, grad-cam and the model
        good = client.post("/predict", files={"image": ("film.png", png_bytes(), "image/png")})
        assert good.status_code == 200, good.text
        body = good.json()
        assert body["label"] in body["probabilities"] and len(body["probabilities"]) == 3
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-3
        assert body["gradcam_png"].startswith("data:image/png;base64,")
        assert body["model"].startswith("xray-classifier:")
        for files in (
            {"image": ("notes.txt", b"this is not an image", "text/plain")},
            {"image": ("empty.png", b"", "image/png")},
            {"image": ("cut.png", png_bytes()[:60], "image/png")},
            {"other": ("film.png", png_bytes(), "image/png")},
        ):
            bad = client.post("/predict", files=files)
            assert bad.status_code == 400, (files, bad.text)
            assert bad.json()["detail"]
        text_field = client.post("/predict", data={"image": "not a file"})
        assert text_field.status_code == 400
        pixels = np.asarray(Image.open(io.BytesIO(png_bytes())).convert("L"))
        film = client.post("/predict", files={"image": ("film.dcm", dcm.uncompressed(pixels, 12, "MONOCHROME1"), "application/dicom")})
        assert film.status_code == 200, film.text
        assert film.json()["probabilities"] == pytest.approx(body["probabilities"], abs=1e-4)  # same film, same answer
        mpeg = client.post("/predict", files={"image": ("film.dcm", dcm.undecodable(pixels), "application/dicom")})
        assert mpeg.status_code == 415 and "no decoder installed" in mpeg.json()["detail"]


# ---------------------------------------------------------------- failure, cancel and resume


def test_cancel_a_run(server: AppServer, trained: dict) -> None:
    with server.client() as client:
        run_id = start_training(client, TINY_OVERRIDES)
        cancel = client.post(f"/runs/{run_id}/cancel")
        assert cancel.status_code == 202, cancel.text
        detail = wait_for_run(client, run_id, timeout_s=60)
    assert detail["status"] == "failed" and "SIGTERM" in detail["reason"]


def test_killed_worker_is_failed_and_the_next_run_reuses_its_stages(server: AppServer, trained: dict) -> None:
    """SIGKILL mid-training: the run says failed (never 'running' forever), the next run resumes from cache."""
    # A transformation config no earlier run used, so its cache entry can only come from the killed run.
    resume = [*TINY_OVERRIDES, "transformation.image_size=40"]
    slow = [*resume, "trainer.epochs=500", "trainer.early_stopping_patience=0"]
    with server.client() as client:
        run_id = start_training(client, slow)
        running = wait_for_run(
            client,
            run_id,
            timeout_s=120,
            until=lambda d: d["status"] in ("succeeded", "failed") or (d["progress"].get("epoch") or 0) >= 1,
        )
        assert running["status"] == "running" and running["current_stage"] == "model_trainer", running
        os.kill(running["pid"], signal.SIGKILL)
        failed = wait_for_run(client, run_id, timeout_s=30)
        assert failed["status"] == "failed"
        assert "SIGKILL" in failed["reason"] and "model_trainer" in failed["reason"]
        assert failed["stages"]["model_trainer"]["status"] == "failed"
        assert failed["stages"]["data_transformation"]["status"] == "succeeded"

        next_id = start_training(client, resume)
        done = wait_for_run(client, next_id)
    assert done["status"] == "succeeded", done["reason"]
    assert done["stages"]["data_transformation"]["cached_from"] == run_id


# ---------------------------------------------------------------- restart


def test_restart_shows_the_same_runs_and_fails_orphans(server: AppServer, trained: dict) -> None:
    from xray.pipeline.store import RunDir

    with server.client(READ_TOKEN) as client:
        before = {r["run_id"]: r["status"] for r in client.get("/runs").json()}
    server.stop()
    # A run whose worker died while the app was down: 'running' in its manifest, its pid gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = RunDir.create(server.artifacts, {"note": "orphan"}, "demo")
    orphan.start_stage("model_trainer")
    orphan.update(pid=dead.pid, host=socket.gethostname())

    server.restart(XRAY_TRAIN_TOKENS=None, XRAY_ADMIN_TOKENS=None)  # also: no train (or admin) token configured
    try:
        with server.client(READ_TOKEN) as client:
            after = {r["run_id"]: r for r in client.get("/runs").json()}
            assert {k: after[k]["status"] for k in before} == before
            assert after[orphan.run_id]["status"] == "failed"
            assert f"worker process {dead.pid} is gone" in after[orphan.run_id]["reason"]
        with server.client(TRAIN_TOKEN) as client:
            refused = client.post("/train", json={"overrides": TINY_OVERRIDES})
            assert refused.status_code == 503 and "XRAY_TRAIN_TOKENS" in refused.json()["detail"]
    finally:
        server.restart(XRAY_TRAIN_TOKENS=TRAIN_TOKEN, XRAY_ADMIN_TOKENS=ADMIN_TOKEN)
    listed = run_cli("runs", "--artifacts", str(server.artifacts), "list", timeout=60)
    assert orphan.run_id in listed.stdout and "running" not in listed.stdout


# ---------------------------------------------------------------- predict through a Bento service


class _FakeBento(BaseHTTPRequestHandler):
    """Answers like the Bento service: JSON for /predict, a PNG for /explain, 400 JSON for a non-image."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if b"\x89PNG" not in body:
            self._send(400, "application/json", json.dumps({"error": "not a readable image: fake"}).encode())
        elif self.path == "/predict":
            answer = {
                "label": "normal",
                "probabilities": {"normal": 0.7, "pneumonia": 0.3},
                "model": "xray-classifier:fake",
            }
            self._send(200, "application/json", json.dumps(answer).encode())
        elif self.path == "/explain":
            self._send(200, "image/png", png_bytes(16, 16))
        else:
            self._send(404, "application/json", b"{}")

    def _send(self, status: int, kind: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_predict_through_the_bento_url(tmp_path: Path) -> None:
    bento = ThreadingHTTPServer(("127.0.0.1", 0), _FakeBento)
    threading.Thread(target=bento.serve_forever, daemon=True).start()
    app = new_server(tmp_path, XRAY_BENTO_URL=f"http://127.0.0.1:{bento.server_address[1]}").start()
    try:
        with app.client(READ_TOKEN) as client:
            good = client.post("/predict", files={"image": ("film.png", png_bytes(), "image/png")})
            assert good.status_code == 200, good.text
            assert good.json()["label"] == "normal" and good.json()["source"].startswith("Bento service")
            assert good.json()["gradcam_png"].startswith("data:image/png;base64,")
            bad = client.post("/predict", files={"image": ("notes.txt", b"hello", "text/plain")})
            assert bad.status_code == 400 and "not a readable image" in bad.json()["detail"]
            bento.shutdown()
            bento.server_close()
            down = client.post("/predict", files={"image": ("film.png", png_bytes(), "image/png")})
            assert down.status_code == 503 and "cannot be reached" in down.json()["detail"]
    finally:
        app.stop()


# ---------------------------------------------------------------- the login cookie


def test_login_cookie_for_the_pages(server: AppServer, trained: dict) -> None:
    run_id = trained["run_id"]
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as browser:
        assert browser.get("/ui/runs").headers["location"].startswith("/login?next=/ui/runs")
        assert browser.post("/login", data={"token": "nope", "next": "/ui/runs"}).status_code == 401
        away = browser.post("/login", data={"token": READ_TOKEN, "next": "//evil.example/"})
        assert away.status_code == 303 and away.headers["location"] == "/ui/runs"  # no open redirect
        login = browser.post("/login", data={"token": TRAIN_TOKEN, "next": f"/ui/runs/{run_id}"})
        assert login.status_code == 303 and login.headers["location"] == f"/ui/runs/{run_id}"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        page = browser.get(f"/ui/runs/{run_id}")
        assert page.status_code == 200
        assert 'id="model-card"' in page.text and "SYNTHETIC demo phantoms" in page.text  # the rendered model card
        assert "<th>95 % interval</th>" in page.text
        assert browser.get("/runs").status_code == 200  # the cookie works for the API's reads too
        cross = browser.post(f"/ui/runs/{run_id}/cancel", headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403
        same = browser.post(f"/ui/runs/{run_id}/cancel", headers={"Origin": server.url})
        assert same.status_code == 409 and "already succeeded" in same.text  # an HTML page, not a 500
        assert browser.post("/logout").status_code == 303


def test_process_liveness_checks() -> None:
    import time

    from xray.api.jobs import process_alive

    assert process_alive(os.getpid(), time.time())
    assert not process_alive(os.getpid(), time.time() - 24 * 3600)  # started after the last write: recycled pid
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while process_alive(zombie.pid, time.time()) and time.monotonic() < deadline:
        time.sleep(0.05)  # it exits at once but is not reaped: a zombie must not count as alive
    assert not process_alive(zombie.pid, time.time())
    assert zombie.poll() == 0
    assert not process_alive(zombie.pid, time.time())
    assert not process_alive(None)
