"""Helpers for the serving tests: a real `bentoml serve` on loopback and image payloads.

The server runs in its own process group so that stopping it also stops the
worker processes BentoML (circus) starts for each service.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import wait_until_ready
from xray.ports import free_port

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")


@dataclass(frozen=True)
class BentoServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def start_bento_server(bentoml_home: Path, log: Path, env: dict[str, str], timeout_s: float = 120) -> BentoServer:
    """`bentoml serve xray.serving.service:XrayClassifier` on a free port; returns once /readyz answers 200."""
    port = free_port()
    full_env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true", **env}
    command = [str(BENTOML), "serve", "xray.serving.service:XrayClassifier", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = BentoServer(url=f"http://127.0.0.1:{port}", process=process, log=log)
    if wait_until_ready(process, f"{server.url}/readyz", timeout_s, server.log_tail):
        return server
    stop_process_group(process)
    raise RuntimeError(f"bentoml serve not ready after {timeout_s}s:\n{server.log_tail()}")


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the server's process group (its workers included), SIGKILL what is left after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def radiograph(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth grayscale blob on noise: compresses like a film, not like white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2))
    return np.clip(blob * 200 + rng.normal(0, 8, (height, width)), 0, 255).astype(np.uint8)


def png_header_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims ``width×height`` but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def multipart_body(parts: list[tuple[str, bytes, str | None]], boundary: str = "xray-test-boundary") -> tuple[bytes, str]:
    """Hand-built multipart: (name, payload, filename or None for a text field) -> body, content type."""
    lines = []
    for name, payload, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        lines.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + payload + b"\r\n")
    body = b"".join(lines) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def histogram(metrics_text: str, name: str) -> tuple[float, float, dict[str, float]]:
    """(count, sum, {le: cumulative count}) of one Prometheus histogram, summed over its label sets."""
    count = total = 0.0
    buckets: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.startswith(f"{name}_count"):
            count += float(value)
        elif series.startswith(f"{name}_sum"):
            total += float(value)
        elif series.startswith(f"{name}_bucket"):
            le = series.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = buckets.get(le, 0.0) + float(value)
    return count, total, buckets


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def lab_tiff() -> bytes:
    """A TIFF in CIELAB mode: Pillow reads it, but it holds no plain grey level."""
    grey = Image.fromarray(radiograph())
    return encode(Image.merge("LAB", [grey, grey, grey]), "TIFF")


# Images outside the allowed formats (or modes): each must be refused with 415, never decoded further.
UNSUPPORTED_IMAGES = {
    "gif": lambda: encode(Image.fromarray(radiograph()), "GIF"),
    "bmp": lambda: encode(Image.fromarray(radiograph()), "BMP"),
    "webp": lambda: encode(Image.fromarray(radiograph()), "WEBP"),
    "eps": lambda: EPS,
    "lab_tiff": lab_tiff,
}


def fake_ghostscript(bin_dir: Path, marker: Path) -> str:
    """A ``gs`` first on PATH that only records that it ran: proof that no EPS reached Ghostscript."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "gs"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
