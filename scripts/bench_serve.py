#!/usr/bin/env python3
"""Serving benchmark: the Bento service against the seed FastAPI reference, same machine, same image.

    python scripts/bench_serve.py [--image FILE] [--concurrency 8 1] [--seconds 40] [--rounds 2]
                                  [--env XRAY_MAX_BATCH_SIZE=8 ...] [--skip-reference]

Why: the service's batching, bf16 and decode path are only worth their
complexity if they beat the one-image-per-request baseline on the hardware we
have. Both servers get a randomly initialised DenseNet-121 (224×224, 3
classes; throughput does not depend on the weights), get the same warm-up, and
are driven in turn (never both at once) by ../shared/tools/loadgen.py on
loopback, alternating for --rounds so drift in the machine's background load
hits both alike. Prints req/s, p50 and p99 of each run, the 1-minute load
average after it, the mean batch size BentoML formed, and the median ratios
ours / reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from xray.ports import free_port  # noqa: E402 - after the repo is importable

SHARED = REPO.parent / "shared"
LOADGEN = SHARED / "tools" / "loadgen.py"
REFERENCE = SHARED / "reference" / "seed_predict_api.py"
DEFAULT_IMAGE_DIR = SHARED / "datasets" / "covid19-3class" / "train" / "Covid"
CLASSES = ("Covid", "Normal", "Viral Pneumonia")


@dataclass(frozen=True)
class Result:
    server: str
    concurrency: int
    requests: int
    errors: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None
    load: float = 0.0  # 1-minute load average after the run: other work on the machine skews both servers


def push_densenet(home: Path) -> str:
    """A random DenseNet-121 in a private model store, in the servable format the pusher writes."""
    os.environ["BENTOML_HOME"] = str(home)
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    sys.path.insert(0, str(REPO))
    import bentoml
    import torch

    from xray.models.builders import build_model
    from xray.data.preprocessing import Preprocessing
    from xray.serving.serving_model import DEFAULT_MODEL_NAME, ModelSpec, write_model_dir

    torch.manual_seed(0)
    model = build_model("densenet121", len(CLASSES))
    checkpoint = Path(tempfile.mkdtemp(prefix="xray-bench-")) / "random.pt"
    torch.save(model.state_dict(), checkpoint)
    spec = ModelSpec(
        architecture="densenet121",
        class_names=CLASSES,
        preprocessing=Preprocessing(image_size=224, mean=0.5, std=0.25),
        run_id="bench-random-init",
        data_fingerprint="none",
        weights_sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest(),  # serving refuses weights that differ
        metrics={},
    )
    # The pusher's ONNX export and its check, on random films (the weights are random too).
    import dataclasses

    import numpy as np

    from xray.serving.runtime import make_export

    films = np.random.default_rng(0).integers(0, 256, (16, 224, 224), dtype=np.uint8)
    export_dir = checkpoint.parent / "export"
    export_dir.mkdir()
    spec = dataclasses.replace(spec, export=make_export(model, spec.preprocessing, (), films[:8], films, export_dir))
    with bentoml.models.create(DEFAULT_MODEL_NAME, labels={"stage": "bench"}, metadata={}) as stored:
        write_model_dir(Path(stored.path), spec, checkpoint, export_dir=export_dir)
    checkpoint.unlink()
    return str(stored.tag)


def start(command: list[str], env: dict[str, str], log: Path, ready_url: str, timeout_s: float = 300) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[:3]} exited ({process.returncode}); log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(process)
    raise SystemExit(f"{command[:3]} not ready after {timeout_s}s; log:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop the server's whole process group (BentoML starts a worker process per service)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def loadgen(url: str, image: Path, field: str, concurrency: int, requests: int, seconds: float) -> dict:
    command = [
        sys.executable, str(LOADGEN), url, str(image), "--field", field,
        "--concurrency", str(concurrency), "--requests", str(requests), "--seconds", str(seconds),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def batch_histogram(base_url: str) -> tuple[float, float]:
    """(forward passes, images) so far, from BentoML's adaptive batch-size histogram."""
    calls = images = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_count"):
            calls += float(line.rsplit(" ", 1)[1])
        elif line.startswith("bentoml_service_adaptive_batch_size_sum"):
            images += float(line.rsplit(" ", 1)[1])
    return calls, images


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    field: str
    metrics_url: str | None  # BentoML's /metrics, for the batch sizes
    process: subprocess.Popen


def start_ours(tag: str, home: Path, args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "XRAY_MODEL_TAG": tag}
    env.update(dict(item.split("=", 1) for item in args.env))
    command = [
        str(Path(sys.executable).with_name("bentoml")), "serve", "xray.serving.service:XrayClassifier",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    process = start(command, env, logs / "bentoml.log", f"{base}/readyz")
    return Server("bentoml", f"{base}/predict", "image", base, process)


def start_reference(logs: Path) -> Server:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start([sys.executable, str(REFERENCE), "--port", str(port)], dict(os.environ), logs / "reference.log", f"{base}/openapi.json")
    return Server("reference", f"{base}/predict/", "file", None, process)


def measure(server: Server, image: Path, concurrency: int, args: argparse.Namespace) -> Result:
    before = batch_histogram(server.metrics_url) if server.metrics_url else None
    out = loadgen(server.url, image, server.field, concurrency, args.requests, args.seconds)
    mean_batch = None
    if before is not None:
        after = batch_histogram(server.metrics_url)
        calls = after[0] - before[0]
        mean_batch = (after[1] - before[1]) / calls if calls else None
    print(f"  {server.name} c={concurrency}: {json.dumps(out)}", flush=True)
    return Result(
        server.name, concurrency, out["requests"], out["errors"], out["req_per_s"], out["p50_ms"], out["p99_ms"],
        mean_batch, os.getloadavg()[0],
    )


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def report(results: list[Result], concurrency: list[int]) -> None:
    print()
    print(f"{'server':<10} {'conc':>4} {'reqs':>5} {'errs':>4} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>10} {'load':>5}")
    for r in results:
        batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        print(
            f"{r.server:<10} {r.concurrency:>4} {r.requests:>5} {r.errors:>4} {r.req_per_s:>8.2f} "
            f"{r.p50_ms:>9.1f} {r.p99_ms:>9.1f} {batch:>10} {r.load:>5.1f}"
        )
    print()
    for c in concurrency:
        ours = [r for r in results if r.server == "bentoml" and r.concurrency == c]
        ref = [r for r in results if r.server == "reference" and r.concurrency == c]
        if not ours or not ref:
            continue
        rps = median([r.req_per_s for r in ours]) / median([r.req_per_s for r in ref])
        p50 = median([r.p50_ms for r in ours]) / median([r.p50_ms for r in ref])
        p99 = median([r.p99_ms for r in ours]) / median([r.p99_ms for r in ref])
        target = " (targets: req/s >= 4, p99 <= 0.5)" if c == 8 else ""
        print(f"concurrency {c} (median of {len(ours)} rounds), ours / reference: req/s x{rps:.2f}, p50 x{p50:.2f}, p99 x{p99:.2f}{target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=None, help="default: first file of covid19-3class/train/Covid")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--requests", type=int, default=2000, help="cap per measurement")
    parser.add_argument("--seconds", type=float, default=40, help="cap per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the servers this many times (drift in background load)")
    parser.add_argument("--warmup", type=int, default=16, help="requests before measuring (discarded)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="service settings to try")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    args = parser.parse_args()
    image = args.image or sorted(DEFAULT_IMAGE_DIR.iterdir())[0]

    with tempfile.TemporaryDirectory(prefix="xray-bench-") as tmp:
        root = Path(tmp)
        from xray.capability import capability

        print(capability().describe(), flush=True)
        print(f"image: {image} ({image.stat().st_size} bytes); cpus: {os.cpu_count()}; env: {args.env or '-'}", flush=True)
        servers: list[Server] = []
        try:
            if not args.skip_ours:
                tag = push_densenet(root / "bentoml")
                servers.append(start_ours(tag, root / "bentoml", args, root))
            if not args.skip_reference:
                servers.append(start_reference(root))
            # Both are up, but only one is ever under load: each is warmed, then measured, in turn.
            for server in servers:
                loadgen(server.url, image, server.field, 8, args.warmup, args.seconds)
            results = [
                measure(server, image, c, args)
                for _ in range(args.rounds)
                for c in args.concurrency
                for server in servers
            ]
        finally:
            for server in servers:
                stop(server.process)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in root.glob("*.log"):
                    (args.logs / log.name).write_bytes(log.read_bytes())
        report(results, args.concurrency)


if __name__ == "__main__":
    main()
