#!/usr/bin/env python3
"""Serving benchmark: the Bento service, per runtime, against the seed FastAPI reference, same machine, same image.

    python scripts/bench_serve.py [--image FILE | --full-size] [--concurrency 1 8 32] [--seconds 40]
                                  [--rounds 2] [--runtimes torch auto] [--pushed TAG --pushed-home DIR]
                                  [--env XRAY_MAX_BATCH_SIZE=8 ...] [--skip-reference]

Why: the service's batching, runtime and decode path are only worth their
complexity if they beat the one-image-per-request baseline on the hardware we
have. Every server gets a randomly initialised DenseNet-121 (224×224, 3
classes; throughput does not depend on the weights), pushed with the pusher's
ONNX export and its check. One Bento starts per ``--runtimes`` entry
(``XRAY_RUNTIME``: torch is eager PyTorch, auto the runtime measured fastest
here); with ``--pushed``, the same runtimes also serve that pushed model (the
ensemble ``xray train`` pushes, at its trained size) as a second model row.
All get the same warm-up and are driven in turn (never two at once) by
../shared/tools/loadgen.py on loopback, alternating for --rounds so drift in
the machine's background load hits all alike.

Prints each server's cold start (``bentoml serve`` to a ready ``/readyz``),
the runtime and precision it logged, and per run req/s, p50 and p99, the mean
batch BentoML formed, the utilization (forward GFLOP per film, test-time views
included, times req/s, over the measured conv peak at the precision served;
int8 is set against the fp32 peak, as no int8 peak is measured) and the
median ratios to the reference. ``--full-size`` serves the image upscaled to
2,500 px on its long side as a PNG, to include the cost of decoding a
full-size film.
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
    model: str
    concurrency: int
    requests: int
    errors: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None
    load: float = 0.0  # 1-minute load average after the run: other work on the machine skews both servers
    utilization: float | None = None  # achieved forward GFLOP/s over the measured peak at the precision served


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


def start(command: list[str], env: dict[str, str], log: Path, ready_url: str, timeout_s: float = 300) -> tuple[subprocess.Popen, float]:
    """The started server and its cold start in seconds (the command's start to a 200 from ``ready_url``)."""
    started = time.monotonic()
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
                return process, time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
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
    name: str  # reference, or bento:<XRAY_RUNTIME>
    model: str  # densenet121-224, or the pushed model's tag
    url: str
    field: str
    metrics_url: str | None  # BentoML's /metrics, for the batch sizes
    process: subprocess.Popen
    cold_start_s: float = 0.0  # start of the command to a ready health check
    served: str = "torch fp32"  # runtime and precision, from the Bento's log
    gflop_per_film: float = 2.0 * 2.87  # forward work per film, test-time views included
    peak_gflops: float = 0.0


@dataclass(frozen=True)
class Model:
    """A model in a BentoML store, with its forward cost."""

    tag: str
    home: Path
    label: str
    gflop_per_film: float


def forward_gflop(home: Path, tag: str) -> float:
    """GFLOP of one film through the stored model, every test-time view included (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from xray.serving.serving_model import load_model_dir

    name, version = tag.split(":")  # BentoML's store layout: the store is bound once per process, so by path
    loaded = load_model_dir(home / "models" / name / version)
    size = loaded.spec.preprocessing.image_size
    channels = 3 if loaded.spec.architecture == "seed_densenet121" else 1
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        loaded.model.eval()(torch.zeros(1, channels, size, size))
    return counter.get_total_flops() / 1e9 * (1 + len(loaded.spec.tta))


def start_ours(model: Model, runtime: str, args: argparse.Namespace, logs: Path, peaks: dict[str, float]) -> Server:
    port = free_port()
    env = {
        **os.environ, "BENTOML_HOME": str(model.home), "BENTOML_DO_NOT_TRACK": "true", "XRAY_MODEL_TAG": model.tag,
        "XRAY_RUNTIME": runtime,
    }
    env.update(dict(item.split("=", 1) for item in args.env))
    command = [
        str(Path(sys.executable).with_name("bentoml")), "serve", "xray.serving.service:XrayClassifier",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    log = logs / f"bentoml-{model.label.replace(':', '-')}-{runtime}.log"
    process, cold = start(command, env, log, f"{base}/readyz")
    serving = httpx.get(f"{base}/metadata", timeout=30).json()["serving"]
    precision = serving["precision"]
    served = f"{serving['runtime']} {precision}"
    server = Server(
        f"bento:{runtime}", model.label, f"{base}/predict", "image", base, process, cold, served,
        model.gflop_per_film, peaks.get(precision, peaks["fp32"]),
    )
    print(f"{server.name} ({server.model}): ready in {cold:.1f} s, serving {served}", flush=True)
    return server


def start_reference(logs: Path, peaks: dict[str, float]) -> Server:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process, cold = start(
        [sys.executable, str(REFERENCE), "--port", str(port)], dict(os.environ), logs / "reference.log", f"{base}/openapi.json"
    )
    print(f"reference: ready in {cold:.1f} s", flush=True)
    return Server("reference", "densenet121-224", f"{base}/predict/", "file", None, process, cold, "torch fp32",
                  2.0 * 2.87, peaks["fp32"])


def measure(server: Server, image: Path, concurrency: int, args: argparse.Namespace) -> Result:
    before = batch_histogram(server.metrics_url) if server.metrics_url else None
    out = loadgen(server.url, image, server.field, concurrency, args.requests, args.seconds)
    mean_batch = None
    if before is not None:
        after = batch_histogram(server.metrics_url)
        calls = after[0] - before[0]
        mean_batch = (after[1] - before[1]) / calls if calls else None
    print(f"  {server.name} ({server.model}) c={concurrency}: {json.dumps(out)}", flush=True)
    utilization = out["req_per_s"] * server.gflop_per_film / server.peak_gflops if server.peak_gflops else None
    return Result(
        server.name, server.model, concurrency, out["requests"], out["errors"], out["req_per_s"], out["p50_ms"],
        out["p99_ms"], mean_batch, os.getloadavg()[0], utilization,
    )


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def report(results: list[Result], servers: list[Server], concurrency: list[int]) -> None:
    print()
    print(f"{'server':<18} {'model':<22} {'served':<18} {'cold s':>6}")
    for server in servers:
        print(f"{server.name:<18} {server.model:<22} {server.served:<18} {server.cold_start_s:>6.1f}")
    print()
    print(
        f"{'server':<18} {'model':<22} {'conc':>4} {'reqs':>5} {'errs':>4} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'batch':>6} {'util':>6} {'load':>5}"
    )
    for r in results:
        batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        util = f"{100 * r.utilization:.0f}%" if r.utilization is not None else "-"
        print(
            f"{r.server:<18} {r.model:<22} {r.concurrency:>4} {r.requests:>5} {r.errors:>4} {r.req_per_s:>8.2f} "
            f"{r.p50_ms:>9.1f} {r.p99_ms:>9.1f} {batch:>6} {util:>6} {r.load:>5.1f}"
        )
    print()
    for c in concurrency:
        ref = [r for r in results if r.server == "reference" and r.concurrency == c]
        for server in servers:
            ours = [r for r in results if (r.server, r.model) == (server.name, server.model) and r.concurrency == c]
            if not ours or not ref or server.name == "reference":
                continue
            rps = median([r.req_per_s for r in ours]) / median([r.req_per_s for r in ref])
            p50 = median([r.p50_ms for r in ours]) / median([r.p50_ms for r in ref])
            p99 = median([r.p99_ms for r in ours]) / median([r.p99_ms for r in ref])
            util = [r.utilization for r in ours if r.utilization is not None]
            print(
                f"concurrency {c}, {server.name} ({server.model}, {server.served}) / reference, median of {len(ours)}: "
                f"req/s x{rps:.2f}, p50 x{p50:.2f}, p99 x{p99:.2f}"
                + (f", utilization {100 * median(util):.0f}%" if util else "")
            )


def full_size(image: Path, out: Path, long_side: int = 2500) -> Path:
    """``image`` upscaled to ``long_side`` px on its long side, as an 8-bit grey PNG."""
    from PIL import Image

    with Image.open(image) as film:
        grey = film.convert("L")
        scale = long_side / max(grey.size)
        grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.LANCZOS).save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=None, help="default: first file of covid19-3class/train/Covid")
    parser.add_argument("--full-size", action="store_true", help="serve the image upscaled to 2,500 px, as a PNG")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000, help="cap per measurement")
    parser.add_argument("--seconds", type=float, default=40, help="cap per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the servers this many times (drift in background load)")
    parser.add_argument("--warmup", type=int, default=16, help="requests before measuring (discarded)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "auto"], help="XRAY_RUNTIME of each Bento")
    parser.add_argument("--pushed", default=None, metavar="TAG", help="also serve this pushed model (second model row)")
    parser.add_argument("--pushed-home", type=Path, default=None, help="its BENTOML_HOME (default: $BENTOML_HOME)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="service settings to try")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    args = parser.parse_args()
    image = args.image or sorted(DEFAULT_IMAGE_DIR.iterdir())[0]

    with tempfile.TemporaryDirectory(prefix="xray-bench-") as tmp:
        root = Path(tmp)
        from xray.capability import capability

        cap = capability()
        peaks = {"fp32": cap.fp32_conv_gflops, "bf16": cap.bf16_conv_gflops, "int8": cap.fp32_conv_gflops}
        print(cap.describe(), flush=True)
        if args.full_size:
            image = full_size(image, root / "full-size.png")
        print(f"image: {image} ({image.stat().st_size} bytes); cpus: {os.cpu_count()}; env: {args.env or '-'}", flush=True)
        models: list[Model] = []
        if not args.skip_ours:
            home = root / "bentoml"
            tag = push_densenet(home)
            models.append(Model(tag, home, "densenet121-224", forward_gflop(home, tag)))
            if args.pushed:
                pushed_home = args.pushed_home or Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
                models.append(Model(args.pushed, pushed_home, args.pushed, forward_gflop(pushed_home, args.pushed)))
        for model in models:
            print(f"{model.label}: {model.gflop_per_film:.2f} GFLOP per film", flush=True)
        servers: list[Server] = []
        results: list[Result] = []
        try:
            # All are up (each cold start timed alone), but only one is ever under load: each is warmed, then measured, in turn.
            if not args.skip_reference:
                servers.append(start_reference(root, peaks))
            for model in models:
                for runtime in args.runtimes:
                    servers.append(start_ours(model, runtime, args, root, peaks))
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
        report(results, servers, args.concurrency)


if __name__ == "__main__":
    main()
