#!/usr/bin/env python3
"""Soak test: concurrent clients against the Bento's /predict for minutes; errors and memory growth.

    python scripts/soak.py [--seconds 300] [--clients 16] [--model-tag TAG --bentoml-home DIR]

Why: a leak or a slow failure (a worker that dies under load, a queue that
grows) only shows over minutes of steady traffic, never in a unit test.
Without --model-tag it trains and pushes a tiny model (the test suite's tiny
config on the demo data) into a private BentoML home, starts
``bentoml serve xray.serving.service:XrayClassifier`` on a free loopback port, warms
it up, then runs --clients clients that each send one request at a time (so
at most --clients are in flight) until --seconds pass. Prints req/s, errors,
p50/p99 latency and the summed RSS of the server's processes after warm-up
and at the end. Pass line: 0 errors and RSS growth under 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, start, stop  # noqa: E402 - the benchmark's server handling (and its port choice), reused

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")
TINY = [
    "trainer.epochs=1", "trainer.min_steps=0", "trainer.candidates=[simple_cnn]", "trainer.batch_size=16",
    "transformation.image_size=32", "ingestion.demo_images_per_class=12", "ingestion.min_images_per_class=5",
    "evaluation.gradcam_per_class=1", "gate.min_roc_auc=0",
]


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "avx512_bf16" if "avx512_bf16" in flags else "avx2" if "avx2" in flags else platform.machine()
    return f"{kind}, {os.cpu_count()} cores"


def push_tiny_model(home: Path, artifacts: Path) -> str:
    command = [sys.executable, "-m", "xray", "-q", "train", "--data", "demo"]
    for item in [*TINY, f"artifacts_dir={artifacts}"]:
        command += ["--set", item]
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the tiny training run failed:\n{done.stderr[-3000:]}")
    return "xray-classifier:" + (home / "models" / "xray-classifier" / "latest").read_text().strip()


def group_rss_mib(pgid: int) -> float:
    """Summed resident memory of every process in the server's process group (BentoML runs one per worker)."""
    total_kib = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total_kib / 1024


def server_problems(log: Path, context: int = 30) -> str:
    """The server log's lines around its first errors: the log itself goes with the temporary directory."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    hits = [i for i, line in enumerate(lines) if "Traceback" in line or " ERROR " in line or "Error" in line]
    shown: list[str] = []
    for i in hits[:3]:
        shown += lines[max(0, i - 3) : i + context] + ["..."]
    return "\n".join(shown)


def film() -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    blob = np.exp(-(((yy - 128) / 80) ** 2 + ((xx - 128) / 60) ** 2))
    pixels = np.clip(blob * 200 + rng.normal(0, 8, blob.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


async def client_loop(
    http: httpx.AsyncClient, image: bytes, deadline: float, latencies: list[float], errors: list[str]
) -> None:
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            response = await http.post("/predict", files={"image": ("film.png", image, "image/png")})
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        latencies.append(time.monotonic() - started)


async def soak(url: str, clients: int, seconds: float) -> tuple[list[float], list[str], float]:
    image = film()
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        started = time.monotonic()
        deadline = started + seconds
        await asyncio.gather(*(client_loop(http, image, deadline, latencies, errors) for _ in range(clients)))
        return latencies, errors, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model-tag", help="serve this model from --bentoml-home instead of training a tiny one")
    parser.add_argument("--bentoml-home", type=Path)
    args = parser.parse_args()
    if args.seconds <= 0 or args.clients < 1:
        parser.error("--seconds must be positive and --clients at least 1")
    if args.model_tag and not args.bentoml_home:
        parser.error("--model-tag needs --bentoml-home")
    with tempfile.TemporaryDirectory(prefix="xray-soak-") as tmp:
        work = Path(tmp)
        home = args.bentoml_home or work / "bentoml"
        tag = args.model_tag or push_tiny_model(home, work / "artifacts")
        port = free_port()
        env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "XRAY_MODEL_TAG": tag}
        command = [str(BENTOML), "serve", "xray.serving.service:XrayClassifier", "--host", "127.0.0.1", "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        server = start(command, env, work / "serve.log", f"{url}/readyz")
        try:
            asyncio.run(soak(url, args.clients, min(10.0, args.seconds)))  # warm-up: lazy imports, kernels, pools
            rss_start = group_rss_mib(server.pid)
            latencies, errors, elapsed = asyncio.run(soak(url, args.clients, args.seconds))
            rss_end = group_rss_mib(server.pid)
        finally:
            stop(server)
            problems = server_problems(work / "serve.log")
    growth = (rss_end - rss_start) / rss_start * 100 if rss_start else float("nan")
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    print(f"cpu: {cpu_kind()}; model {tag}; {args.clients} clients for {elapsed:.0f} s")
    print(f"requests: {len(latencies)}  req/s: {len(latencies) / elapsed:.1f}  errors: {len(errors)}")
    print(f"latency p50: {quantiles[49] * 1000:.0f} ms  p99: {quantiles[98] * 1000:.0f} ms")
    print(f"server RSS (all processes): start {rss_start:.0f} MiB, end {rss_end:.0f} MiB, growth {growth:+.1f} %")
    for error in sorted(set(errors))[:5]:
        print(f"  error: {error}")
    if errors and problems:
        print("server log, around its errors:\n" + problems)
    passed = not errors and growth < 10
    print("PASS" if passed else "FAIL", "(0 errors and RSS growth under 10 %)")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
