"""The training service against a hostile caller: a real uvicorn, real HTTP, no run is ever started.

The server holds the gate (overrides outside the allowlist need an admin
token), data stay inside the configured roots, bodies are bounded before
parsing and auth, failed tokens are rate-limited, and every malformed input
gets a 4xx with a message, never a 500 or a server path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app_helpers import ADMIN_TOKEN, READ_TOKEN, TRAIN_TOKEN, AppServer, new_server, png_bytes
from tests.serving_fixtures import UNSUPPORTED_IMAGES, fake_ghostscript

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[AppServer]:
    """Data roots: ``home/data`` and ``home`` itself (which holds the artifacts: those stay refused)."""
    data = home / "data"
    data.mkdir()
    (data / "notes.txt").write_text("not a dataset")
    os.symlink("/etc", data / "etc-link")
    snapshot = home / "artifacts" / "20260101T000000000Z-abcdef" / "data_ingestion" / "snapshot"
    snapshot.mkdir(parents=True)
    path = fake_ghostscript(home / "bin", home / "ghostscript-ran")
    app = new_server(
        home / "app", XRAY_DATA_ROOTS=f"{data}:{home}", XRAY_DATA_BUCKETS="allowed-bucket", PATH=path
    )
    app.env["XRAY_ARTIFACTS_DIR"] = str(home / "artifacts")
    app.start()
    yield app
    app.stop()


def run_dirs(server: AppServer) -> set[str]:
    return {p.name for p in server.artifacts.iterdir() if p.is_dir() and not p.name.startswith(".")}


# ---------------------------------------------------------------- the gate belongs to the server

HOSTILE_OVERRIDES = [
    "gate.min_roc_auc=0",
    "gate.compare_with_production=false",
    "push.s3_uri=s3://attacker/loot",
    "push.enabled=true",
    "ingestion.s3.endpoint_url=http://attacker.example",
    "trainer.weights=/etc/passwd",
    "trainer.num_threads=64",
    "artifacts_dir=/tmp/elsewhere",
    "data_uri=/etc",
    "gate..min_roc_auc=0",  # spelled oddly, still gate.min_roc_auc
    " gate.min_roc_auc =0",
    "trainer={weights: /etc/passwd}",  # a whole section at once
    "trainer.replay_plan=/etc/passwd",  # reads a file on the server, as trainer.weights does
]


@pytest.mark.parametrize("override", HOSTILE_OVERRIDES)
def test_train_token_cannot_touch_server_held_keys(server: AppServer, override: str) -> None:
    before = run_dirs(server)
    with server.client(TRAIN_TOKEN) as client:
        response = client.post("/train", json={"overrides": ["trainer.epochs=1", override]})
    assert response.status_code == 403, response.text
    key = ".".join(p for p in override.partition("=")[0].strip().split(".") if p)
    assert f"override {key!r} needs an admin token" in response.json()["detail"]
    assert run_dirs(server) == before


def test_allowed_overrides_are_range_checked_for_every_role(server: AppServer) -> None:
    before = run_dirs(server)
    for token in (TRAIN_TOKEN, ADMIN_TOKEN):
        with server.client(token) as client:
            for override, key in (
                ("trainer.epochs=1000000000", "trainer.epochs"),
                ("trainer.cv_folds=-3", "cv_folds"),
                ("transformation.image_size=100000", "image_size"),
                ("trainer.seed=-1", "trainer.seed"),
            ):
                response = client.post("/train", json={"overrides": [override]})
                assert response.status_code == 422, (token, override, response.text)
                assert key in response.json()["detail"]
    with server.client(ADMIN_TOKEN) as admin:
        for override in ("trainer.learning_rate=.nan", "trainer.num_threads=-5", "evaluation.calibration_bins=0"):
            response = admin.post("/train", json={"overrides": [override]})
            assert response.status_code == 422, (override, response.text)
        # An admin may send server-held keys: refused here only for the data, which is outside the roots.
        passed = admin.post("/train", json={"data": "/etc", "overrides": ["gate.min_roc_auc=0.5"]})
        assert passed.status_code == 403 and "outside the data" in passed.json()["detail"]
    assert run_dirs(server) == before


# ---------------------------------------------------------------- data confined to the roots


def test_data_outside_the_roots_is_refused_alike_whether_or_not_it_exists(server: AppServer, home: Path) -> None:
    before = run_dirs(server)
    outside = [
        "/etc",
        "/no/such/folder",
        "/tmp",
        str(home / "data" / ".." / ".." / "elsewhere"),
        str(home / "data" / "etc-link"),  # a symlink inside a root that leads out of it
        str(home / "artifacts" / "20260101T000000000Z-abcdef" / "data_ingestion" / "snapshot"),  # another run
        str(home / "artifacts"),
        "~nosuchuser",
        "~root",
        "../../etc",
        "x" * 300,
        "s3://other-bucket/data",
    ]
    bodies = set()
    with server.client(TRAIN_TOKEN) as client:
        for uri in outside:
            response = client.post("/train", json={"data": uri})
            assert response.status_code == 403, (uri, response.text)
            bodies.add(response.text)
        assert len(bodies) == 1, bodies  # one answer: nothing tells an existing path from a missing one
        assert str(home) not in bodies.pop()
        inside_missing = client.post("/train", json={"data": str(home / "data" / "nope")})
        assert inside_missing.status_code == 400 and "does not exist" in inside_missing.json()["detail"]
        not_a_dataset = client.post("/train", json={"data": str(home / "data" / "notes.txt")})
        assert not_a_dataset.status_code == 400 and "folder or an .npz" in not_a_dataset.json()["detail"]
        for bad in ("s3://../x", "s3://allowed-bucket/../x", "s3://allowed-bucket/a/./b", "s3://", "demo\x00"):
            response = client.post("/train", json={"data": bad})
            assert response.status_code == 400, (bad, response.text)
    assert run_dirs(server) == before


def test_no_roots_means_demo_only(tmp_path: Path) -> None:
    app = new_server(tmp_path / "app").start()
    try:
        with app.client(TRAIN_TOKEN) as client:
            assert client.post("/train", json={"data": str(tmp_path)}).status_code == 403
            assert client.post("/train", json={"data": "s3://xray-data/demo"}).status_code == 403
    finally:
        app.stop()


# ---------------------------------------------------------------- limits before work


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def test_an_unauthenticated_100_mib_body_is_cut_off_early(server: AppServer) -> None:
    assert server.process is not None
    before = vm_hwm_kib(server.process.pid)

    def body() -> Iterator[bytes]:  # no Content-Length: only the streaming count can stop it
        for _ in range(100):
            yield b" " * MiB

    try:
        response = httpx.post(
            f"{server.url}/train", content=body(), headers={"Content-Type": "application/json"}, timeout=60
        )
        status = response.status_code
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        status = None  # the server answered and closed while the client was still sending: also cut off
    grown_mib = (vm_hwm_kib(server.process.pid) - before) / 1024
    assert status in (413, None), status
    assert grown_mib < 30, f"peak RSS grew by {grown_mib:.1f} MiB"
    declared = httpx.post(
        f"{server.url}/train",
        content=b"{" + b" " * (MiB) + b"}",
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert declared.status_code == 413, declared.text  # before auth: no token was sent
    with server.client(READ_TOKEN) as client:
        big = client.post("/predict", files={"image": ("big.png", b"\0" * (21 * MiB), "image/png")})
        assert big.status_code == 413, big.text


def test_failed_tokens_are_rate_limited(tmp_path: Path) -> None:
    app = new_server(tmp_path / "app", XRAY_AUTH_MAX_FAILURES="3", XRAY_AUTH_WINDOW_S="3").start()
    try:
        with app.client("wrong-token-000000000000") as wrong, app.client(READ_TOKEN) as good:
            assert [wrong.get("/runs").status_code for _ in range(3)] == [401, 401, 401]
            limited = wrong.get("/runs")
            assert limited.status_code == 429, limited.text
            wait = int(limited.headers["Retry-After"])
            assert 1 <= wait <= 3
            assert good.get("/runs").status_code == 429  # the client, not the token, is limited
            form = httpx.post(f"{app.url}/login", data={"token": "guess", "next": "/ui/runs"})
            assert form.status_code == 429
            time.sleep(wait + 0.2)
            assert good.get("/runs").status_code == 200
    finally:
        app.stop()


# ---------------------------------------------------------------- 4xx, never 500


def test_malformed_paths_and_run_ids_are_4xx_without_server_paths(server: AppServer, home: Path) -> None:
    paths = [
        "/runs/" + "r" * 300,
        "/runs/~nosuchuser",
        "/runs/a%00b",
        "/runs/%00",
        "/runs/" + "r" * 300 + "/log",
        "/runs/" + "r" * 300 + "/verify",
        "/runs/20260101T000000000Z-abcdef/artifacts/" + "a" * 300,
        "/runs/20260101T000000000Z-abcdef/artifacts/a%00b",
        "/runs/no-such-run",
        "/runs/no-such-run/artifacts/manifest.json",
        "/ui/runs/" + "r" * 300,
        "/ui/runs/~nosuchuser",
    ]
    with server.client(READ_TOKEN) as client:
        for path in paths:
            response = client.get(path)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
            assert str(home) not in response.text and "/tmp/" not in response.text, (path, response.text[:300])


def test_one_malformed_manifest_does_not_break_the_runs_list(server: AppServer) -> None:
    damaged = {
        "20260102T000000000Z-000001": b"{not json",
        "20260102T000000000Z-000002": b"[1, 2, 3]",
        "20260102T000000000Z-000003": b"\xff\xfe\x00garbage",
        "20260102T000000000Z-000004": json.dumps({"run_id": 5, "status": ["x"]}).encode(),
    }
    for run_id, content in damaged.items():
        (server.artifacts / run_id).mkdir()
        (server.artifacts / run_id / "manifest.json").write_bytes(content)
    with server.client(READ_TOKEN) as client:
        listed = client.get("/runs")
        assert listed.status_code == 200, listed.text
        statuses = {r["run_id"]: r["status"] for r in listed.json()}
        assert {statuses[run_id] for run_id in damaged} == {"broken"}
        for run_id in damaged:
            one = client.get(f"/runs/{run_id}")
            assert one.status_code == 404 and str(server.artifacts) not in one.text, one.text
        page = client.get("/ui/runs")
        assert page.status_code == 200 and "broken" in page.text


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED_IMAGES))
def test_unsupported_image_formats_are_415_and_never_reach_ghostscript(
    server: AppServer, home: Path, kind: str
) -> None:
    payload = UNSUPPORTED_IMAGES[kind]()
    with server.client(READ_TOKEN) as client:
        client.timeout = httpx.Timeout(180)  # the first upload imports the image stack on a busy machine
        api = client.post("/predict", files={"image": (f"x.{kind}", payload, "application/octet-stream")})
        assert api.status_code == 415, api.text
        assert "not accepted" in api.json()["detail"]
        page = client.post("/ui/predict", files={"image": (f"x.{kind}", payload, "application/octet-stream")})
        assert page.status_code == 415, page.text[:300]
    assert not (home / "ghostscript-ran").exists()


def test_allowed_formats_get_past_the_format_check(server: AppServer) -> None:
    """No model is pushed on this server: a PNG is judged readable, then 503 (not 4xx) for the missing model."""
    with server.client(READ_TOKEN) as client:
        client.timeout = httpx.Timeout(180)
        response = client.post("/predict", files={"image": ("film.png", png_bytes(), "image/png")})
    assert response.status_code == 503, response.text


# ---------------------------------------------------------------- offline docs


def test_docs_load_their_assets_from_the_service(server: AppServer) -> None:
    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200
    assert "https://" not in page.text and "http://" not in page.text  # nothing from a CDN
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in page.text
        fetched = httpx.get(f"{server.url}{asset}")
        assert fetched.status_code == 200 and len(fetched.content) > 10_000, asset


# ---------------------------------------------------------------- settings and the limiter, directly


def test_settings_read_roots_admin_tokens_and_limits(tmp_path: Path) -> None:
    from xray.api.settings import AppSettings
    from xray.errors import ConfigError

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("admin: [file-admin-token-0123456789]\nread: [file-read-token-0123456789]\n")
    env = {
        "XRAY_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "XRAY_DATA_ROOTS": f"{tmp_path / 'a'}:{tmp_path / 'b'},relative",
        "XRAY_DATA_BUCKETS": "one, two",
        "XRAY_TOKENS_FILE": str(tokens),
        "XRAY_MAX_JSON_BYTES": "1000",
    }
    settings = AppSettings.from_env(env, cwd=tmp_path)
    assert settings.data_allowed == {  # one entry per allowlist the data sources declare
        "XRAY_DATA_ROOTS": tuple(str(tmp_path / name) for name in ("a", "b", "relative")),
        "XRAY_DATA_BUCKETS": ("one", "two"),
    }
    assert settings.tokens.admin == ("file-admin-token-0123456789",)
    assert settings.max_json_bytes == 1000
    for name, value in (("XRAY_MAX_JSON_BYTES", "0"), ("XRAY_AUTH_MAX_FAILURES", "-1"), ("XRAY_AUTH_WINDOW_S", "soon")):
        with pytest.raises(ConfigError, match=name):
            AppSettings.from_env({**env, name: value}, cwd=tmp_path)


def test_the_limiter_forgets_failures_after_its_window() -> None:
    from xray.api.ratelimit import FailedAuthLimiter

    now = [100.0]
    limiter = FailedAuthLimiter(max_failures=2, window_s=10, clock=lambda: now[0], max_clients=2)
    limiter.record_failure("a")
    assert limiter.retry_after("a") is None
    now[0] = 104.0
    limiter.record_failure("a")
    assert limiter.retry_after("a") == 6  # the first failure leaves the window at 110
    assert limiter.retry_after("b") is None  # per client
    now[0] = 110.5
    assert limiter.retry_after("a") is None
    for client in ("b", "c", "d"):
        limiter.record_failure(client)
    assert "a" not in limiter._failures and len(limiter._failures) == 2  # bounded memory: oldest client forgotten
