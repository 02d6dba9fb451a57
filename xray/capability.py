"""What this CPU can do, measured once per machine: instruction sets, cores, fp32/bf16 peaks.

The same two-core machine is sometimes an AVX-512 part with native bf16 and
sometimes AVX2 only, where bf16 matmul runs many times slower than fp32
(docs/benchmarks.md). Flags alone
have misled (a CPU may list ``avx512_bf16`` and still be slow through torch's
kernels), so precision is chosen from measured throughput: bf16 only where it
beats fp32 by ``BF16_MARGIN`` on both matmul and convolution.

Peaks are measured on one thread against that thread's CPU time
(``time.thread_time``) and multiplied by the thread count: the machine is
often shared, and wall-clock timing on a loaded machine once recorded a conv
"peak" far too low, which would then have been cached for good.

The measurement takes a few seconds and is cached in
``$XRAY_CACHE_DIR/capability.json`` (default ``~/.cache/xray``), keyed by CPU
model, flags, torch version and thread count; a corrupt cache is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from xray.typed import SchemaError, from_mapping, to_jsonable

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "XRAY_CACHE_DIR"
CACHE_FILE = "capability.json"
BF16_MARGIN = 1.25  # bf16 must be this much faster than fp32 (matmul and conv) to be chosen
PROBE_SECONDS = 0.25  # timed window per measurement
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Capability:
    """One machine's measured compute; ``describe()`` is the line every benchmark prints."""

    cpu_model: str
    flags: tuple[str, ...]  # those of FLAGS_OF_INTEREST the CPU lists
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): the kernels torch dispatches to
    torch_version: str
    cores: int
    threads: int  # torch threads: the peaks are one thread's (per CPU-second) times this
    fp32_matmul_gflops: float
    bf16_matmul_gflops: float
    fp32_conv_gflops: float
    bf16_conv_gflops: float

    @property
    def kind(self) -> str:
        if "amx_bf16" in self.flags:
            return "AMX"
        if "avx512_bf16" in self.flags:
            return "AVX-512-bf16"
        if "avx512f" in self.flags:
            return "AVX-512"
        return "AVX2" if "avx2" in self.flags else "baseline"

    @property
    def prefers_bf16(self) -> bool:
        """bf16 pays only where it is measurably faster, for the matmuls and the convolutions alike."""
        return (
            self.bf16_matmul_gflops >= BF16_MARGIN * self.fp32_matmul_gflops
            and self.bf16_conv_gflops >= BF16_MARGIN * self.fp32_conv_gflops
        )

    def peak_gflops(self, precision: str) -> float:
        """The measured conv peak at ``precision``: what a CNN's training could reach at best."""
        return self.bf16_conv_gflops if precision == "bf16" else self.fp32_conv_gflops

    def describe(self) -> str:
        return (
            f"cpu: {self.kind} ({self.cpu_model}; torch {self.torch_capability}), {self.cores} cores, "
            f"{self.threads} threads; matmul fp32 {self.fp32_matmul_gflops:.1f} / bf16 {self.bf16_matmul_gflops:.1f} "
            f"GFLOP/s, conv fp32 {self.fp32_conv_gflops:.1f} / bf16 {self.bf16_conv_gflops:.1f} GFLOP/s; "
            f"auto precision {'bf16' if self.prefers_bf16 else 'fp32'}"
        )


def cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "xray"
    return Path(root) / CACHE_FILE


def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(model name, flags of interest) from /proc/cpuinfo; ("unknown", ()) where it is unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", ()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags":
            flags.update(value.split())
    return model, tuple(f for f in FLAGS_OF_INTEREST if f in flags)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cache_key(model: str, flags: tuple[str, ...], threads: int) -> str:
    return f"{model}|{','.join(flags)}|torch {torch.__version__}|{threads} threads|per-core v2"


@lru_cache(maxsize=None)
def capability(threads: int | None = None) -> Capability:
    """This machine's capability at ``threads`` (default: torch's current count), measured once and cached."""
    threads = threads or torch.get_num_threads()
    model, flags = cpu_identity()
    key = _cache_key(model, flags, threads)
    path = cache_path()
    cached = _read_cache(path)
    if key in cached:
        try:
            return from_mapping(Capability, cached[key])
        except (SchemaError, TypeError):
            logger.warning("capability cache entry for %s is malformed; measuring again", key)
    found = measure(threads, model, flags)
    _write_cache(path, {**cached, key: to_jsonable(found)})
    logger.info("%s (measured; cached in %s)", found.describe(), path)
    return found


def cached_measurement(key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Another once-per-machine measurement (``key`` names what and at which versions), in the same cache file."""
    model, flags = cpu_identity()
    full_key = f"{model}|{','.join(flags)}|{key}"
    path = cache_path()
    cached = _read_cache(path)
    entry = cached.get(full_key)
    if isinstance(entry, dict) and entry and all(isinstance(v, (int, float)) for v in entry.values()):
        return {str(k): float(v) for k, v in entry.items()}
    found = measure()
    _write_cache(path, {**_read_cache(path), full_key: found})
    return found


def measure(threads: int, model: str = "", flags: tuple[str, ...] | None = None) -> Capability:
    """Time fp32 and bf16 matmul and a 3x3 convolution on one thread (CPU time), x ``threads`` (a few seconds)."""
    if flags is None:
        model, flags = cpu_identity()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            peaks = {
                (kind, dtype): probe(dtype)
                for kind, probe in (("matmul", _matmul_gflops), ("conv", _conv_gflops))
                for dtype in (torch.float32, torch.bfloat16)
            }
    finally:
        torch.set_num_threads(previous)
    return Capability(
        cpu_model=model,
        flags=tuple(flags),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        torch_version=torch.__version__,
        cores=cores(),
        threads=threads,
        fp32_matmul_gflops=round(threads * peaks["matmul", torch.float32], 2),
        bf16_matmul_gflops=round(threads * peaks["matmul", torch.bfloat16], 2),
        fp32_conv_gflops=round(threads * peaks["conv", torch.float32], 2),
        bf16_conv_gflops=round(threads * peaks["conv", torch.bfloat16], 2),
    )


def _rate(run: Callable[[], object], flops: float) -> tuple[float, float]:
    """(GFLOP per CPU-second of this thread, CPU seconds per call) after one warm-up call, over PROBE_SECONDS."""
    run()
    calls, started = 0, time.thread_time()
    while True:
        run()
        calls += 1
        elapsed = time.thread_time() - started
        if elapsed >= PROBE_SECONDS:
            return flops * calls / elapsed / 1e9, elapsed / calls


def _matmul_gflops(dtype: torch.dtype) -> float:
    """Grow the matrices until one product takes 20 ms of CPU: big enough for the kernel's peak, and a slow
    dtype (bf16 on AVX2) stops at a small size instead of taking minutes."""
    best = 0.0
    for n in (128, 256, 512, 1024):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        rate, seconds = _rate(lambda: torch.mm(a, b), 2.0 * n**3)
        best = max(best, rate)
        if seconds > 0.02:
            break
    return best


def _conv_gflops(dtype: torch.dtype) -> float:
    """A DenseNet-like 3x3 convolution (channels-last, 64 -> 32 channels) at growing batch."""
    conv = torch.nn.Conv2d(64, 32, 3, padding=1, bias=False).to(dtype).to(memory_format=torch.channels_last)
    best = 0.0
    for batch in (1, 4, 16):
        x = torch.randn(batch, 64, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)
        rate, seconds = _rate(lambda: conv(x), 2.0 * batch * 64 * 32 * 9 * 32 * 32)
        best = max(best, rate)
        if seconds > 0.02:
            break
    return best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        logger.warning("capability cache %s is unreadable or corrupt; measuring again", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    """Atomic replace, so a concurrent reader never sees half a file; a read-only home only costs a re-measure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        logger.warning("cannot write the capability cache %s (%s); it will be measured again next time", path, exc)
