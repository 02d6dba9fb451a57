"""Helpers for the app tests: a real ``uvicorn app:app`` on loopback, stopped by its PID.

Each server gets its own artifacts root and BentoML home through the
environment, so tests never touch the developer's runs or models.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tests.conftest import TINY, wait_until_ready
from xray.ports import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN_TOKEN = "train-token-0123456789abcdef"
READ_TOKEN = "read-token-fedcba9876543210"
ADMIN_TOKEN = "admin-token-5a5a5a5a5a5a5a5a"  # the tests' tiny configs set keys only an admin may (gate, ingestion)
TERMINAL = ("succeeded", "failed")

# Fast settings for an end-to-end run through the API: the same as the CLI tests use.
TINY_OVERRIDES = list(TINY)


@dataclass
class AppServer:
    """One ``uvicorn app:app`` process; ``restart`` keeps the same artifacts root."""

    home: Path
    env: dict[str, str]
    url: str = ""
    process: subprocess.Popen | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def artifacts(self) -> Path:
        return Path(self.env["XRAY_ARTIFACTS_DIR"])

    def start(self, timeout_s: float = 60) -> AppServer:
        port = free_port()
        self.starts += 1
        log = self.home / f"uvicorn-{self.starts}.log"
        self.logs.append(log)
        command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{port}"
        if wait_until_ready(self.process, f"{self.url}/healthz", timeout_s, self.log_tail):
            return self
        self.stop()
        raise RuntimeError(f"the app did not come up in {timeout_s}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM by PID (uvicorn shuts down gracefully), SIGKILL if it hangs."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def restart(self, **env: str | None) -> AppServer:
        self.stop()
        for key, value in env.items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        return self.start()

    def client(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())[-chars:]


def new_server(home: Path, **extra_env: str) -> AppServer:
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "XRAY_ARTIFACTS_DIR": str(home / "artifacts"),
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "XRAY_TRAIN_TOKENS": TRAIN_TOKEN,
        "XRAY_READ_TOKENS": READ_TOKEN,
        "XRAY_ADMIN_TOKENS": ADMIN_TOKEN,
        **extra_env,
    }
    for key in ("XRAY_BENTO_URL", "XRAY_TOKENS_FILE", "XRAY_CONFIG"):
        if key not in extra_env:
            env.setdefault(key, "")
    return AppServer(home=home, env=env)


def start_training(client: httpx.Client, overrides: list[str], data: str | None = None) -> str:
    body: dict = {"overrides": overrides}
    if data is not None:
        body["data"] = data
    response = client.post("/train", json=body)
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


def wait_for_run(client: httpx.Client, run_id: str, timeout_s: float = 180, until=TERMINAL) -> dict:
    """Poll ``GET /runs/{id}`` until its status is one of ``until`` (or the predicate is true)."""
    deadline = time.monotonic() + timeout_s
    detail: dict = {}
    while time.monotonic() < deadline:
        response = client.get(f"/runs/{run_id}")
        assert response.status_code == 200, response.text
        detail = response.json()
        if until(detail) if callable(until) else detail["status"] in until:
            return detail
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} not done in {timeout_s}s: {detail}")


def png_bytes(height: int = 96, width: int = 80, seed: int = 0) -> bytes:
    """A smooth grayscale blob on noise: a stand-in radiograph."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2))
    pixels = np.clip(blob * 200 + rng.normal(0, 8, (height, width)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
