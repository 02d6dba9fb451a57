"""The Bento service: ``/predict``, ``/explain`` and ``/metadata`` over the production model.

Two BentoML services, because BentoML batches only calls that reach a
batchable API through its server (a direct ``self.method()`` call inside one
service is a plain Python call):

* ``XrayClassifier`` (public): size-limits the upload, decodes it with the
  shared ``xray.data.preprocessing`` path in a small thread pool, turns bad input
  into 400/413 JSON, and sends the ``1×H×W`` pixels to ...
* ``XrayModel`` (internal, reached through ``bentoml.depends``): holds the
  model (bf16 weights + channels_last where the CPU has bf16) and serves a
  ``batchable`` ``classify``. Under ``bentoml serve`` it runs in its own
  processes (two by default, the cores split between them: a DenseNet at
  batch 1-4 scales poorly across threads, two workers don't), so concurrent
  front requests meet in an adaptive-batching dispatcher and run as one
  forward pass; the batch sizes show up in ``/metrics`` as
  ``bentoml_service_adaptive_batch_size``.

Settings come from the environment when the module is imported (the batch
limits are decorator arguments): ``XRAY_MODEL_TAG`` (default: the production
pointer of ``XRAY_MODEL_NAME``, see ``xray.audit.registry``), ``XRAY_MAX_UPLOAD_BYTES``,
``XRAY_MAX_PIXELS``, ``XRAY_MAX_BATCH_SIZE``, ``XRAY_MAX_LATENCY_MS``,
``XRAY_PRECISION``, ``XRAY_DECODE_THREADS``, ``XRAY_MAX_CONCURRENCY``,
``XRAY_FRONT_WORKERS``, ``XRAY_MODEL_WORKERS``, ``XRAY_MODEL_THREADS``, ``XRAY_SERVE_TOKENS``
(comma-separated bearer tokens for ``/predict``, ``/explain``, ``/metrics`` and ``/metadata``; unset:
they are open, as a Bento behind its own gateway usually is).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncGenerator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.responses import JSONResponse

from xray.entity.config_entity import DEFAULT_MAX_UPLOAD_BYTES
from xray.serving.inference import choose_device, choose_precision
from xray.evaluation.operating_point import positive_indices
from xray.data.preprocessing import DEFAULT_MAX_PIXELS, ImageTooLargeError, UnsupportedImageFormat, load_for_model
from xray.audit.registry import production_tag
from xray.serving.serving_model import DEFAULT_MODEL_NAME, read_card, read_spec
from xray.audit.tokens import matches_any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSettings:
    """Everything an operator can tune without touching code; read once at import."""

    model_tag: str = f"{DEFAULT_MODEL_NAME}:latest"
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_size: int = 16  # bounds the memory of one forward pass
    max_latency_ms: int = 30_000  # BentoML answers 503 rather than queue past this
    precision: str = "auto"  # auto = bf16 where the CPU/GPU has it, else fp32
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
            decode_threads=number("XRAY_DECODE_THREADS", defaults.decode_threads),
            max_concurrency=number("XRAY_MAX_CONCURRENCY", defaults.max_concurrency),
            front_workers=number("XRAY_FRONT_WORKERS", defaults.front_workers),
            model_workers=number("XRAY_MODEL_WORKERS", defaults.model_workers),
            model_threads=number("XRAY_MODEL_THREADS", defaults.model_threads),
            serve_tokens=tuple(t.strip() for t in env.get("XRAY_SERVE_TOKENS", "").split(",") if t.strip()),
        )

    def threads_per_model_worker(self) -> int:
        return self.model_threads or max(1, (os.cpu_count() or 1) // self.model_workers)


def production_or_latest(model_name: str) -> str:
    """``bentoml serve`` and ``bentoml build`` follow the production pointer, not merely the newest version."""
    return production_tag(model_name) or f"{model_name}:latest"


SETTINGS = ServingSettings.from_env()
BACKEND_ATTEMPTS = 3
# aiohttp RuntimeErrors that mean the session was replaced under an in-flight call, not a bad request.
DROPPED_CONNECTION_MESSAGES = ("Session is closed", "Connection closed")


class OperatingPointAnswer(BaseModel):
    """The shipped threshold and where this image falls: ``positive`` is ``score >= threshold``."""

    positive_classes: list[str]
    threshold: float
    score: float  # P(positive): the summed probability of the positive classes
    target_sensitivity: float


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    model: str
    positive: bool | None = None  # at the operating point; null when the model ships none
    operating_point: OperatingPointAnswer | None = None


def json_safe(value: Any) -> Any:
    """NaN/inf (an undefined ROC-AUC, say) -> null: strict JSON encoders refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ServeTokenGuard:
    """401 on the guarded routes unless the request carries ``Authorization: Bearer <serve token>``.

    Runs in front of everything BentoML serves (its ``/metrics`` included), so
    the model's outputs and its metadata need the token once one is set; the
    health probes (``/livez``, ``/readyz``) stay open for the orchestrator.
    """

    def __init__(self, app: Any, tokens: tuple[str, ...], routes: tuple[str, ...]) -> None:
        self.app = app
        self.tokens = tokens
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.tokens or scope.get("path", "").rstrip("/") not in self.routes:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip() and matches_any(token.strip().encode(), self.tokens):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "this route needs 'Authorization: Bearer <token>' with a token from XRAY_SERVE_TOKENS"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


class UploadGuard:
    """ASGI middleware in front of the upload APIs, so bad requests get 4xx, not BentoML's 500.

    Any body above ``max_bytes`` gets 413 (a declared ``Content-Length`` is
    refused unread; a chunked body is read only up to the limit). On the
    upload routes the multipart form is parsed once here and refused with
    400/415 where BentoML's own parser would raise (no or broken multipart, a
    text ``image`` field, which it would try to fetch as a URL, or a file under
    another field name, which it would try to decode as JSON), then the
    buffered body is replayed to the app.
    """

    def __init__(self, app: Any, max_bytes: int, upload_routes: tuple[str, ...], file_field: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_routes = upload_routes
        self.file_field = file_field

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        upload = scope.get("path") in self.upload_routes
        if declared is not None and not upload:
            await self.app(scope, receive, send)
            return

        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if upload and (problem := await self._form_problem(headers, body)) is not None:
            await error_response(*problem)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _form_problem(self, headers: Headers, body: bytes) -> tuple[int, str] | None:
        field = self.file_field
        if headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return 415, f"send the image as a multipart/form-data file field named {field!r}"

        async def stream() -> AsyncGenerator[bytes, None]:
            yield body

        try:
            form = await MultiPartParser(headers, stream(), max_files=4, max_fields=16).parse()
        except Exception as exc:  # noqa: BLE001 - whatever the parser trips over is a malformed request
            return 400, f"malformed multipart/form-data body: {exc}"
        try:
            images = form.getlist(field)
            stray = [name for name, value in form.multi_items() if isinstance(value, UploadFile) and name != field]
            if stray:
                return 400, f"unexpected file field {stray[0]!r}: send the image as field {field!r}"
            if not images:
                return 400, f"the multipart field {field!r} (the image file) is missing"
            if len(images) > 1:
                return 400, f"send one image per request (got {len(images)} {field!r} fields)"
            if not isinstance(images[0], UploadFile):
                return 400, f"field {field!r} must be a file upload, not a text value"
            return None
        finally:
            await form.close()

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        await error_response(413, message)(scope, receive, send)


@bentoml.service(
    workers=SETTINGS.model_workers,
    threads=1,  # classify and explain share one model; the batcher already runs one batch at a time
    traffic={"timeout": 120},
)
class XrayModel:
    """Internal: the model behind an adaptive-batching API. Not exposed by ``bentoml serve``."""

    model_ref = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        import torch

        from xray.serving.serving_model import load_model_dir

        torch.set_num_threads(SETTINGS.threads_per_model_worker())
        # Weights whose sha256 differs from the store's metadata are refused here: the worker does not start.
        self.loaded = load_model_dir(
            Path(self.model_ref.path), SETTINGS.precision, tag=str(self.model_ref.tag),
            metadata_sha256=self.model_ref.info.metadata.get("weights_sha256"),
        )
        self.image_size = self.loaded.spec.preprocessing.image_size
        # oneDNN builds kernels per input shape: pay for the common batch sizes now, not in the first requests.
        for batch in sorted({1, 2, 4, SETTINGS.max_batch_size}):
            self.loaded.predict_proba(np.zeros((batch, self.image_size, self.image_size), np.uint8), batch)
        logger.info(
            "serving %s (%s, %s, %d torch threads)",
            self.loaded.tag, self.loaded.spec.architecture, self.loaded.precision, torch.get_num_threads(),
        )

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``N×S×S`` (concurrent requests concatenated by BentoML) -> float32 ``N×C`` probabilities."""
        self._check(pixels)
        return self.loaded.predict_proba(pixels, batch_size=SETTINGS.max_batch_size).astype(np.float32)

    @bentoml.api
    def explain(self, pixels: np.ndarray, class_index: int) -> np.ndarray:
        """uint8 ``1×S×S`` -> the RGB uint8 Grad-CAM overlay ``S×S×3`` for ``class_index``."""
        from xray.evaluation.explain import gradcam_overlays

        self._check(pixels)
        if not 0 <= class_index < len(self.loaded.spec.class_names):
            raise bentoml.exceptions.InvalidArgument(f"class index {class_index} out of range")
        return gradcam_overlays(self.loaded.model, pixels[:1], self.loaded.spec.preprocessing, [class_index])[0]

    def _check(self, pixels: np.ndarray) -> None:
        expected = (self.image_size, self.image_size)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != expected:
            raise bentoml.exceptions.InvalidArgument(
                f"expected uint8 N×{expected[0]}×{expected[1]} pixels, got {pixels.dtype} {pixels.shape}"
            )


metadata_app = FastAPI(title="xray metadata", docs_url=None, redoc_url=None, openapi_url=None)


@bentoml.service(
    workers=SETTINGS.front_workers,
    traffic={"timeout": 120, "max_concurrency": SETTINGS.max_concurrency},
)
@bentoml.asgi_app(metadata_app)
class XrayClassifier:
    """Chest X-ray classification: one image per request, batched behind the scenes."""

    model_ref = bentoml.models.BentoModel(SETTINGS.model_tag)
    backend = bentoml.depends(XrayModel)

    def __init__(self) -> None:
        stored = self.model_ref
        self.tag = str(stored.tag)
        self.spec = read_spec(Path(stored.path))
        self.created = stored.info.creation_time.isoformat()
        self.image_size = self.spec.preprocessing.image_size
        self.card = read_card(Path(stored.path))
        point = self.spec.operating_point
        self.positive = positive_indices(point.positive, self.spec.class_names) if point else ()
        self._decode_limiter = anyio.CapacityLimiter(SETTINGS.decode_threads)

    @bentoml.api
    async def predict(self, image: Path) -> Prediction:
        """Classify one radiograph (multipart field ``image``: PNG, JPEG or DICOM, any mode or bit depth)."""
        pixels = await self._pixels(image)
        if isinstance(pixels, JSONResponse):
            return pixels  # type: ignore[return-value]  # an error answer, sent as is
        probabilities = (await self._backend_call("classify", pixels=pixels[None]))[0]
        return self._prediction(probabilities)

    @bentoml.api
    async def explain(self, image: Path, class_name: str | None = None) -> Image.Image:
        """Grad-CAM overlay (PNG) for ``class_name``, or for the predicted class when it is not given."""
        names = list(self.spec.class_names)
        if class_name is not None and class_name not in names:
            return error_response(400, f"unknown class_name {class_name!r}; classes are {names}")  # type: ignore[return-value]
        pixels = await self._pixels(image)
        if isinstance(pixels, JSONResponse):
            return pixels  # type: ignore[return-value]
        if class_name is None:
            probabilities = (await self._backend_call("classify", pixels=pixels[None]))[0]
            index = int(np.argmax(probabilities))
        else:
            index = names.index(class_name)
        overlay = await self._backend_call("explain", pixels=pixels[None], class_index=index)
        return Image.fromarray(np.asarray(overlay, dtype=np.uint8), mode="RGB")

    @metadata_app.get("/metadata")
    def metadata(self) -> dict[str, Any]:
        """What is being served and where it came from (tag, classes, metrics, provenance)."""
        spec = self.spec
        return {
            "model": self.tag,
            "created": self.created,
            "architecture": spec.architecture,
            "members": list(spec.members),
            "tta": list(spec.tta),
            "class_names": list(spec.class_names),
            "image_size": spec.preprocessing.image_size,
            "preprocessing": asdict(spec.preprocessing),
            "run_id": spec.run_id,
            "data_fingerprint": spec.data_fingerprint,
            "weights_sha256": spec.weights_sha256,
            "metrics": json_safe(spec.metrics),
            "operating_point": json_safe(asdict(spec.operating_point)) if spec.operating_point else None,
            "model_card": json_safe(self.card),
            "serving": {
                "precision": choose_precision(choose_device(), SETTINGS.precision),
                "max_batch_size": SETTINGS.max_batch_size,
                "max_upload_bytes": SETTINGS.max_upload_bytes,
                "max_pixels": SETTINGS.max_pixels,
            },
        }

    async def _backend_call(self, api: str, **kwargs: Any) -> Any:
        """Call the model service, retrying a dropped connection (the calls are idempotent).

        BentoML's dependency client replaces its HTTP session every 100 calls
        or 5 minutes and closes the old one with calls still in flight on it;
        those fail with a disconnect, a cut-off response body, or (a call that
        took the old session just before it closed) aiohttp's "Session is
        closed" or "Connection closed", none of which says anything about the
        request.
        """
        import aiohttp

        method = getattr(self.backend.to_async, api)
        for attempt in range(1, BACKEND_ATTEMPTS + 1):
            try:
                return await method(**kwargs)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, RuntimeError) as exc:
                closed_session = isinstance(exc, RuntimeError) and str(exc).startswith(DROPPED_CONNECTION_MESSAGES)
                if attempt == BACKEND_ATTEMPTS or (isinstance(exc, RuntimeError) and not closed_session):
                    raise
                logger.warning("model service call %s dropped (%s); retrying", api, exc)

    async def _pixels(self, image: Path) -> np.ndarray | JSONResponse:
        """The upload -> uint8 ``S×S`` through the shared preprocessing, or the 4xx answer saying why not."""
        try:
            size = image.stat().st_size
        except OSError:
            return error_response(400, "the upload could not be read")
        if size == 0:
            return error_response(400, "the uploaded file is empty")
        if size > SETTINGS.max_upload_bytes:
            return error_response(413, f"the upload is larger than the limit of {SETTINGS.max_upload_bytes} bytes")
        try:
            data = image.read_bytes()
            return await anyio.to_thread.run_sync(
                load_for_model, data, self.spec.preprocessing, SETTINGS.max_pixels, limiter=self._decode_limiter
            )
        except ImageTooLargeError as exc:
            return error_response(413, str(exc))
        except UnsupportedImageFormat as exc:
            return error_response(415, str(exc))
        except Exception as exc:  # noqa: BLE001 - anything the decoder trips over is the input's fault
            logger.info("undecodable upload: %s: %s", type(exc).__name__, exc)
            message = str(exc) if isinstance(exc, ValueError) else f"not a readable image ({type(exc).__name__})"
            return error_response(400, message)

    def _prediction(self, probabilities: np.ndarray) -> Prediction:
        names = self.spec.class_names
        point, answer = self.spec.operating_point, None
        if point is not None:
            score = float(np.sum(probabilities[list(self.positive)]))
            answer = OperatingPointAnswer(
                positive_classes=list(point.positive), threshold=point.threshold,
                score=score, target_sensitivity=point.target_sensitivity,
            )
        return Prediction(
            label=names[int(np.argmax(probabilities))],
            probabilities={name: float(p) for name, p in zip(names, probabilities)},
            model=self.tag,
            positive=None if answer is None else answer.score >= answer.threshold,
            operating_point=answer,
        )


XrayClassifier.add_asgi_middleware(
    ServeTokenGuard, tokens=SETTINGS.serve_tokens, routes=("/predict", "/explain", "/metrics", "/metadata")
)
XrayClassifier.add_asgi_middleware(
    UploadGuard, max_bytes=SETTINGS.max_upload_bytes, upload_routes=("/predict", "/explain"), file_field="image"
)
