"""The Bento's settings: everything an operator tunes through the environment, read once at import.

``XRAY_MODEL_TAG`` (default: the production pointer of ``XRAY_MODEL_NAME``, see
``xray.audit.registry``), ``XRAY_MAX_UPLOAD_BYTES``, ``XRAY_MAX_PIXELS``,
``XRAY_MAX_BATCH_SIZE``, ``XRAY_MAX_LATENCY_MS``, ``XRAY_PRECISION``,
``XRAY_RUNTIME`` (auto | onnxruntime | openvino | torch: what runs the push's ONNX export;
auto: the one measured fastest here, ``xray.serving.runtime``), ``XRAY_DECODE_THREADS``, ``XRAY_MAX_CONCURRENCY``, ``XRAY_FRONT_WORKERS``,
``XRAY_MODEL_WORKERS``, ``XRAY_MODEL_THREADS``, ``XRAY_SERVE_TOKENS``
(comma-separated bearer tokens for ``/predict``, ``/explain``, ``/metrics`` and
``/metadata``; unset: they are open, as a Bento behind its own gateway usually
is). ``XRAY_INPUT_GATE_WARN`` (checks answered as warnings) is read by
``xray.serving.predict.Policy``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from xray.audit.registry import production_tag
from xray.data.preprocessing import DEFAULT_MAX_PIXELS
from xray.entity.config_entity import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class ServingSettings:
    """Everything an operator can tune without touching code; read once at import."""

    model_tag: str = f"{DEFAULT_MODEL_NAME}:latest"
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_size: int = 16  # bounds the memory of one forward pass
    max_latency_ms: int = 30_000  # BentoML answers 503 rather than queue past this
    precision: str = "auto"  # auto = bf16 where the CPU/GPU has it, else fp32 (eager PyTorch)
    runtime: str = "auto"  # auto = the runtime measured fastest on this machine | onnxruntime | openvino | torch
    decode_threads: int = 2  # concurrent image decodes (each may hold a large image)
    max_concurrency: int = 64  # in-flight requests per front worker; beyond: 503
    front_workers: int = 1
    model_workers: int = 2  # single-threaded model processes: at small batches two beat one with two threads
    model_threads: int = 0  # torch threads per model worker; 0 = the machine's cores / model_workers
    serve_tokens: tuple[str, ...] = ()  # bearer tokens for the guarded routes; empty: they are open

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServingSettings:
        def number(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            value = int(raw)
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {raw!r}")
            return value

        defaults = cls()
        precision = env.get("XRAY_PRECISION", defaults.precision)
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"XRAY_PRECISION must be auto, fp32 or bf16, got {precision!r}")
        return cls(
            model_tag=env.get("XRAY_MODEL_TAG") or production_or_latest(env.get("XRAY_MODEL_NAME") or DEFAULT_MODEL_NAME),
            max_upload_bytes=number("XRAY_MAX_UPLOAD_BYTES", defaults.max_upload_bytes),
            max_pixels=number("XRAY_MAX_PIXELS", defaults.max_pixels),
            max_batch_size=max(2, number("XRAY_MAX_BATCH_SIZE", defaults.max_batch_size)),
            max_latency_ms=number("XRAY_MAX_LATENCY_MS", defaults.max_latency_ms),
            precision=precision,
            runtime=_runtime(env.get("XRAY_RUNTIME", defaults.runtime)),
            decode_threads=number("XRAY_DECODE_THREADS", defaults.decode_threads),
            max_concurrency=number("XRAY_MAX_CONCURRENCY", defaults.max_concurrency),
            front_workers=number("XRAY_FRONT_WORKERS", defaults.front_workers),
            model_workers=number("XRAY_MODEL_WORKERS", defaults.model_workers),
            model_threads=number("XRAY_MODEL_THREADS", defaults.model_threads),
            serve_tokens=tuple(t.strip() for t in env.get("XRAY_SERVE_TOKENS", "").split(",") if t.strip()),
        )

    def threads_per_model_worker(self) -> int:
        return self.model_threads or max(1, (os.cpu_count() or 1) // self.model_workers)


def _runtime(value: str) -> str:
    if value not in RUNTIME_CHOICES:
        raise ValueError(f"XRAY_RUNTIME must be one of {', '.join(RUNTIME_CHOICES)}, got {value!r}")
    return value


RUNTIME_CHOICES = ("auto", "onnxruntime", "openvino", "torch")


def production_or_latest(model_name: str) -> str:
    """``bentoml serve`` and ``bentoml build`` follow the production pointer, not merely the newest version."""
    return production_tag(model_name) or f"{model_name}:latest"
