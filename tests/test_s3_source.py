"""S3 data source against a real SeaweedFS server on loopback (no mocks)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.s3_fixtures import (  # noqa: F401 - fixtures are used by name
    ACCESS_KEY,
    SECRET_KEY,
    TEST_BUCKET,
    S3Env,
    boto_client,
    isolate_aws_env,
    make_pngs,
    requires_weed,
    s3env,
    seaweed_server,
    unique_prefix,
)
from xray.errors import SourceError
from xray.ports import free_port as free_loopback_port
from scripts import seaweedfs
from xray.data.sources.s3 import (
    INDEX_NAME,
    LOCK_NAME,
    S3Settings,
    _relative_path,
    mirror_dir_for,
    parse_s3_uri,
    sync_prefix,
    upload_dir,
    upload_file,
)

pytestmark = pytest.mark.timeout(120)

S3_LOGGER = "xray.data.sources.s3"
NAMES = ["NORMAL/a.png", "NORMAL/b.png", "PNEUMONIA/c.png", "PNEUMONIA/d.png", "PNEUMONIA/sub/e.png"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sync_counts(caplog: pytest.LogCaptureFixture) -> tuple[int, int, int]:
    """(reused, downloaded, removed) from the last sync summary log line."""
    records = [r for r in caplog.records if r.name == S3_LOGGER and r.getMessage().startswith("synced ")]
    assert records, "sync_prefix logged no summary"
    args = records[-1].args
    assert isinstance(args, tuple)
    return int(args[2]), int(args[3]), int(args[4])


def read_index(mirror: Path) -> dict:
    return json.loads((mirror / INDEX_NAME).read_text())


# ----------------------------------------------------------------------------- pure


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/prefix") == ("bucket", "prefix/")
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/") == ("bucket", "")
    for bad in ("bucket/prefix", "http://bucket/x", "s3://", "s3:///x", "s3://b@d:1/x", "s3://bucket/x?y=1"):
        with pytest.raises(SourceError):
            parse_s3_uri(bad)


@pytest.mark.parametrize(
    "bad",
    ["s3://../x", "s3://./x", "s3://.hidden/x", "s3://a..b/x", "s3://bucket-/x", "s3://bucket/../x",
     "s3://bucket/a/../../x", "s3://bucket/a/./b", "s3://bucket/a\\b", "s3://bucket/a\x00b"],
)
def test_malformed_s3_uris_are_refused(bad: str) -> None:
    with pytest.raises(SourceError):
        parse_s3_uri(bad)


def test_the_mirror_is_keyed_by_endpoint_bucket_and_prefix(tmp_path: Path) -> None:
    """The same bucket name on two servers never shares a mirror, and no URI leaves the mirror root."""
    root = tmp_path / ".s3-mirror"
    local = mirror_dir_for(root, "s3://data/x", S3Settings(endpoint_url="http://127.0.0.1:9"))
    other = mirror_dir_for(root, "s3://data/x", S3Settings(endpoint_url="http://127.0.0.2:9"))
    assert local != other
    assert local == mirror_dir_for(root, "s3://data/x", S3Settings(endpoint_url="http://127.0.0.1:9"))
    assert local != mirror_dir_for(root, "s3://data/y", S3Settings(endpoint_url="http://127.0.0.1:9"))
    for path in (local, other):
        assert path.resolve().is_relative_to(root.resolve())


def test_keys_escaping_the_mirror_are_refused() -> None:
    # SeaweedFS itself rejects such keys, so this guard is checked directly; AWS accepts them.
    assert _relative_path("data/NORMAL/a.png", "data/") == "NORMAL/a.png"
    for key in ("data/../evil.png", "data/a/../../evil.png", "data//a.png", "data/./a.png", "data/.xray-s3-index.json"):
        with pytest.raises(SourceError, match="refusing S3 key"):
            _relative_path(key, "data/")


def test_one_sync_per_mirror_dir(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with (mirror / LOCK_NAME).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        with pytest.raises(SourceError, match="another sync is already running"):
            sync_prefix("s3://any-bucket/data", mirror, S3Settings(endpoint_url="http://127.0.0.1:9"))


def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    endpoint = f"http://127.0.0.1:{free_loopback_port()}"
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot reach S3 endpoint http://127\.0\.0\.1:\d+"):
        sync_prefix("s3://any-bucket/data", tmp_path / "mirror", S3Settings(endpoint_url=endpoint))
    assert time.monotonic() - started < 10
    with pytest.raises(SourceError, match="cannot reach S3 endpoint"):
        upload_file(Path(__file__), "s3://any-bucket/x/", S3Settings(endpoint_url=endpoint))
    assert time.monotonic() - started < 20


def test_endpoint_from_aws_endpoint_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    port = free_loopback_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(SourceError, match=rf"cannot reach S3 endpoint http://127\.0\.0\.1:{port}"):
        sync_prefix("s3://any-bucket/data", tmp_path / "mirror", S3Settings())


def test_no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    endpoint = f"http://127.0.0.1:{free_loopback_port()}"
    with pytest.raises(SourceError, match="credentials"):
        sync_prefix("s3://any-bucket/data", tmp_path / "mirror", S3Settings(endpoint_url=endpoint))


def test_unknown_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    with pytest.raises(SourceError, match="profile"):
        sync_prefix("s3://any-bucket/data", tmp_path / "mirror", S3Settings(profile="no-such-profile"))


# ----------------------------------------------------------------------------- server


@requires_weed
def test_sync_downloads_everything_with_correct_records(
    s3env: S3Env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=S3_LOGGER)
    originals = make_pngs(tmp_path / "src", NAMES)
    prefix = unique_prefix("sync")
    # A folder marker must be skipped, not mirrored.
    s3env.client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/NORMAL/", Body=b"")
    assert upload_dir(tmp_path / "src", s3env.uri(prefix), s3env.settings) == len(NAMES)

    mirror = tmp_path / "mirror"
    records = sync_prefix(s3env.uri(prefix), mirror, s3env.settings)

    assert [r.key for r in records] == sorted(f"{prefix}/{n}" for n in NAMES)
    assert sync_counts(caplog) == (0, len(NAMES), 0)
    for record in records:
        original = originals[record.relative_path]
        local = (mirror / record.relative_path).read_bytes()
        assert local == original
        assert record.size == len(original)
        assert record.sha256 == sha256_bytes(original) == sha256_bytes(local)
        assert record.etag == hashlib.md5(original).hexdigest()  # single-part PUT: ETag is the MD5
    index = read_index(mirror)
    assert index["complete"] is True
    assert set(index["objects"]) == {r.key for r in records}
    assert not (mirror / ".xray-s3-tmp").exists()


@requires_weed
def test_sync_is_incremental(s3env: S3Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=S3_LOGGER)
    make_pngs(tmp_path / "src", NAMES)
    prefix = unique_prefix("incr")
    uri = s3env.uri(prefix)
    upload_dir(tmp_path / "src", uri, s3env.settings)
    mirror = tmp_path / "mirror"
    first = sync_prefix(uri, mirror, s3env.settings)
    stats = {n: os.stat(mirror / n) for n in NAMES}

    # Unchanged: nothing downloaded, files untouched.
    assert sync_prefix(uri, mirror, s3env.settings) == first
    assert sync_counts(caplog) == (len(NAMES), 0, 0)
    for name, st in stats.items():
        now = os.stat(mirror / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    # One object changed in S3: only that one is fetched again.
    changed = b"\x89PNG not really, but different bytes"
    s3env.client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/NORMAL/a.png", Body=changed)
    records = {r.relative_path: r for r in sync_prefix(uri, mirror, s3env.settings)}
    assert sync_counts(caplog) == (len(NAMES) - 1, 1, 0)
    assert (mirror / "NORMAL/a.png").read_bytes() == changed
    assert records["NORMAL/a.png"].sha256 == sha256_bytes(changed)
    assert os.stat(mirror / "NORMAL/b.png").st_ino == stats["NORMAL/b.png"].st_ino

    # A local file corrupted behind our back fails its sha256 check and is re-fetched.
    (mirror / "PNEUMONIA/c.png").write_bytes(b"corrupt")
    sync_prefix(uri, mirror, s3env.settings)
    assert sync_counts(caplog) == (len(NAMES) - 1, 1, 0)
    assert sha256_bytes((mirror / "PNEUMONIA/c.png").read_bytes()) == records["PNEUMONIA/c.png"].sha256

    # One object deleted in S3: removed from the mirror (and its now-empty folder).
    s3env.client.delete_object(Bucket=TEST_BUCKET, Key=f"{prefix}/PNEUMONIA/sub/e.png")
    remaining = sync_prefix(uri, mirror, s3env.settings)
    assert sync_counts(caplog) == (len(NAMES) - 1, 0, 1)
    assert len(remaining) == len(NAMES) - 1
    assert not (mirror / "PNEUMONIA/sub/e.png").exists()
    assert not (mirror / "PNEUMONIA/sub").exists()
    assert f"{prefix}/PNEUMONIA/sub/e.png" not in read_index(mirror)["objects"]


@requires_weed
def test_mirror_refuses_another_source(s3env: S3Env, tmp_path: Path) -> None:
    make_pngs(tmp_path / "src", NAMES[:1])
    a, b = unique_prefix("a"), unique_prefix("b")
    upload_dir(tmp_path / "src", s3env.uri(a), s3env.settings)
    upload_dir(tmp_path / "src", s3env.uri(b), s3env.settings)
    sync_prefix(s3env.uri(a), tmp_path / "mirror", s3env.settings)
    with pytest.raises(SourceError, match="holds a mirror of"):
        sync_prefix(s3env.uri(b), tmp_path / "mirror", s3env.settings)


@requires_weed
def test_missing_bucket(s3env: S3Env, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"S3 bucket 'no-such-bucket-42' does not exist at http://127\.0\.0\.1"):
        sync_prefix("s3://no-such-bucket-42/data", tmp_path / "mirror", s3env.settings)
    with pytest.raises(SourceError, match="no-such-bucket-42"):
        upload_file(Path(__file__), "s3://no-such-bucket-42/models/", s3env.settings)


@requires_weed
def test_wrong_secret(s3env: S3Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    with pytest.raises(SourceError, match=r"access denied.*credentials") as err:
        sync_prefix(s3env.uri("anything"), tmp_path / "mirror", s3env.settings)
    assert "\n" not in str(err.value)
    with pytest.raises(SourceError, match=r"SignatureDoesNotMatch.*credentials"):
        upload_file(Path(__file__), s3env.uri("models/"), s3env.settings)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    with pytest.raises(SourceError, match=r"InvalidAccessKeyId.*credentials"):
        upload_file(Path(__file__), s3env.uri("models/"), s3env.settings)


@requires_weed
def test_empty_prefix(s3env: S3Env, tmp_path: Path) -> None:
    prefix = unique_prefix("empty")
    s3env.client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/folder/", Body=b"")  # markers only
    with pytest.raises(SourceError, match=rf"no objects under s3://{TEST_BUCKET}/{prefix}/"):
        sync_prefix(s3env.uri(prefix), tmp_path / "mirror", s3env.settings)


@requires_weed
def test_refuses_keys_escaping_the_mirror(s3env: S3Env, tmp_path: Path) -> None:
    prefix = unique_prefix("escape")
    s3env.client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/ok.png", Body=b"ok")
    s3env.client.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/.xray-s3-index.json", Body=b"{}")
    with pytest.raises(SourceError, match="refusing S3 key"):
        sync_prefix(s3env.uri(prefix), tmp_path / "mirror", s3env.settings)


@requires_weed
def test_upload_file_round_trip(s3env: S3Env, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(os.urandom(64 * 1024))
    prefix = unique_prefix("models")
    into_folder = upload_file(model, s3env.uri(f"{prefix}/"), s3env.settings)
    assert into_folder == f"s3://{TEST_BUCKET}/{prefix}/model.pt"
    exact = upload_file(model, s3env.uri(f"{prefix}/v1/best.pt"), s3env.settings)
    assert exact == f"s3://{TEST_BUCKET}/{prefix}/v1/best.pt"
    records = sync_prefix(s3env.uri(prefix), tmp_path / "mirror", s3env.settings)
    assert [r.relative_path for r in records] == ["model.pt", "v1/best.pt"]
    for record in records:
        assert record.sha256 == sha256_bytes(model.read_bytes())
        assert (tmp_path / "mirror" / record.relative_path).read_bytes() == model.read_bytes()


class _KillOnFirstDownload(logging.Handler):
    """Kills the server right after the first object lands: a deterministic mid-sync outage."""

    def __init__(self, server: seaweedfs.SeaweedServer) -> None:
        super().__init__(level=logging.DEBUG)
        self.server = server
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and record.getMessage().startswith("downloaded "):
            self.fired = True
            self.server.kill()


@requires_weed
def test_server_dies_mid_sync_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    data_dir = tmp_path / "weed"
    n_objects = 40
    originals = {f"img_{i:03d}.bin": os.urandom(128 * 1024) for i in range(n_objects)}
    src = tmp_path / "src"
    src.mkdir()
    for name, data in originals.items():
        (src / name).write_bytes(data)
    uri = f"s3://{TEST_BUCKET}/big"
    mirror = tmp_path / "mirror"

    server = seaweedfs.start(data_dir, access_key=ACCESS_KEY, secret_key=SECRET_KEY, buckets=(TEST_BUCKET,))
    try:
        settings = S3Settings(endpoint_url=server.endpoint_url, max_concurrency=2)
        upload_dir(src, uri, settings)
        killer = _KillOnFirstDownload(server)
        logging.getLogger(S3_LOGGER).addHandler(killer)
        caplog.set_level(logging.DEBUG, logger=S3_LOGGER)
        started = time.monotonic()
        try:
            with pytest.raises(SourceError, match=r"cannot reach S3 endpoint|lost connection to S3 endpoint"):
                sync_prefix(uri, mirror, settings)
        finally:
            logging.getLogger(S3_LOGGER).removeHandler(killer)
        assert killer.fired
        assert time.monotonic() - started < 30
    finally:
        server.stop(timeout_s=2.0)

    # The index only claims objects that really are in the mirror, and is not complete.
    index = read_index(mirror)
    assert index["complete"] is False
    claimed = index["objects"]
    assert 1 <= len(claimed) < n_objects
    for entry in claimed.values():
        assert sha256_bytes((mirror / entry["relative_path"]).read_bytes()) == entry["sha256"]
    assert not (mirror / ".xray-s3-tmp").exists()

    # Restart on the same data dir (new ports): the sync resumes and completes.
    server = seaweedfs.start(data_dir, access_key=ACCESS_KEY, secret_key=SECRET_KEY, buckets=(TEST_BUCKET,))
    try:
        settings = S3Settings(endpoint_url=server.endpoint_url, max_concurrency=2)
        caplog.clear()
        records = sync_prefix(uri, mirror, settings)
    finally:
        server.stop(timeout_s=5.0)
    assert sync_counts(caplog) == (len(claimed), n_objects - len(claimed), 0)
    assert len(records) == n_objects
    for record in records:
        assert record.sha256 == sha256_bytes(originals[record.relative_path])
    assert read_index(mirror)["complete"] is True


@requires_weed
def test_s3_server_script_outlives_itself(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "s3_server.py"
    port = seaweedfs.free_port_pair()
    base = [sys.executable, str(script)]
    args = ["--dir", str(tmp_path / "s3"), "--port", str(port)]
    env = {**os.environ, "XRAY_S3_ACCESS_KEY": "k-script", "XRAY_S3_SECRET_KEY": "s-script"}

    def run(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(base + [action, *args], env=env, capture_output=True, text=True, timeout=60)

    started = run("start")
    try:
        assert started.returncode == 0, started.stderr
        assert (
            f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port} AWS_ACCESS_KEY_ID=k-script "
            "AWS_SECRET_ACCESS_KEY=s-script" in started.stdout
        )
        pid = int((tmp_path / "s3" / "weed.pid").read_text())
        status = run("status")  # the starting script has exited; the server must still answer
        assert status.returncode == 0, status.stdout
        client = boto_client(f"http://127.0.0.1:{port}", "k-script", "s-script")
        assert "xray-data" in {b["Name"] for b in client.list_buckets()["Buckets"]}
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "s3" / "weed.pid").exists()
    assert run("status").returncode == 1
    assert not seaweedfs.SeaweedServer(pid, port, tmp_path, "", "").alive()
