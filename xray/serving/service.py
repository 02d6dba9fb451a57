"""The Bento service: ``/predict``, ``/explain`` and ``/metadata`` over the production model.

Only the BentoML service classes live here; what an answer is comes from
``xray.serving.predict`` (the one predict path, shared with the app and the
MLflow pyfunc), the settings from ``xray.serving.settings`` and the ASGI
guards from ``xray.serving.guards``.

Two BentoML services, because BentoML batches only calls that reach a
batchable API through its server (a direct ``self.method()`` call inside one
service is a plain Python call):

* ``XrayClassifier`` (public): size-limits the upload, decodes and checks it
  with ``xray.serving.predict.prepare`` in a small thread pool, turns bad input
  into 400/413/415 JSON and a refused one into 422, and sends the ``1×H×W``
  pixels to ...
* ``XrayModel`` (internal, reached through ``bentoml.depends``): holds the
  model (bf16 weights + channels_last where the CPU has bf16) and serves a
  ``batchable`` ``classify`` (calibrated probabilities and the OOD score). Under
  ``bentoml serve`` it runs in its own processes (two by default, the cores
  split between them: a DenseNet at batch 1-4 scales poorly across threads,
  two workers don't), so concurrent front requests meet in an
  adaptive-batching dispatcher and run as one forward pass; the batch sizes
  show up in ``/metrics`` as ``bentoml_service_adaptive_batch_size``.

Settings come from the environment when the module is imported (the batch
limits are decorator arguments): see ``xray.serving.settings``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from starlette.responses import JSONResponse

from xray.data.preprocessing import ImageTooLargeError, UnsupportedImageFormat
from xray.serving import predict as one_path
from xray.serving.guards import ServeTokenGuard, UploadGuard, error_response
from xray.serving.serving_model import read_card, read_spec
from xray.serving.settings import ServingSettings

logger = logging.getLogger(__name__)

SETTINGS = ServingSettings.from_env()
BACKEND_ATTEMPTS = 3
# aiohttp RuntimeErrors that mean the session was replaced under an in-flight call, not a bad request.
DROPPED_CONNECTION_MESSAGES = ("Session is closed", "Connection closed")


class ReasonAnswer(BaseModel):
    code: str
    message: str


class OperatingPointAnswer(BaseModel):
    """The shipped threshold and where this image falls: ``positive`` is ``score >= threshold``."""

    positive_classes: list[str]
    threshold: float
    score: float  # P(positive): the summed calibrated probability of the positive classes
    target_sensitivity: float


class Prediction(BaseModel):
    """An accepted input's answer (the schema of ``xray.serving.predict.Prediction``); a refused one is 422."""

    label: str
    probabilities: dict[str, float]
    model: str
    positive: bool | None = None  # at the operating point; null when the model ships none
    operating_point: OperatingPointAnswer | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_gate: str = "unavailable"
    warnings: list[ReasonAnswer] = []
    refused: bool = False


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
        # Weights (or OOD statistics) whose sha256 differs from the store's metadata are refused here:
        # the worker does not start.
        metadata = self.model_ref.info.metadata
        self.loaded = load_model_dir(
            Path(self.model_ref.path), SETTINGS.precision, tag=str(self.model_ref.tag),
            metadata_sha256=metadata.get("weights_sha256"), metadata_ood_sha256=metadata.get("ood_stats_sha256"),
            runtime=SETTINGS.runtime, threads=SETTINGS.threads_per_model_worker(),
        )
        self.image_size = self.loaded.spec.preprocessing.image_size
        # oneDNN builds kernels per input shape: pay for the common batch sizes now, not in the first requests.
        for batch in sorted({1, 2, 4, SETTINGS.max_batch_size}):
            self.loaded.scores(np.zeros((batch, self.image_size, self.image_size), np.uint8), batch)
        logger.info(
            "serving %s (%s, runtime %s, %s, %d threads)",
            self.loaded.tag, self.loaded.spec.architecture, self.loaded.runtime, self.loaded.precision,
            torch.get_num_threads(),
        )

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``N×S×S`` (concurrent requests concatenated by BentoML) -> float32 ``N×(C+1)``: the calibrated
        probabilities and the OOD score (``xray.serving.predict.pack``)."""
        self._check(pixels)
        return one_path.pack(self.loaded.scores(pixels, batch_size=SETTINGS.max_batch_size))

    @bentoml.api
    def served(self) -> dict[str, Any]:
        """What this worker runs the model in: ``/metadata`` reports it (the runtime is chosen per worker)."""
        import torch

        return {"runtime": self.loaded.runtime, "precision": self.loaded.precision, "threads": torch.get_num_threads()}

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
        self.policy = one_path.Policy.for_model(self.spec)  # a bad XRAY_INPUT_GATE_WARN stops the start, named
        self._decode_limiter = anyio.CapacityLimiter(SETTINGS.decode_threads)

    @bentoml.api
    async def predict(self, image: Path) -> Prediction:
        """Classify one radiograph (multipart field ``image``: PNG, JPEG or DICOM, any mode or bit depth);
        an input the model cannot judge is refused with 422 and its reasons."""
        prepared = await self._prepared(image)
        if isinstance(prepared, JSONResponse):
            return prepared  # type: ignore[return-value]  # an error answer, sent as is
        probabilities, ood_score = one_path.unpack((await self._backend_call("classify", pixels=prepared.pixels[None]))[0])
        result = one_path.answer(self.spec, self.tag, prepared, probabilities, ood_score, self.policy)
        if isinstance(result, one_path.Refusal):
            return JSONResponse(one_path.answer_json(result), status_code=422)  # type: ignore[return-value]
        return Prediction.model_validate(one_path.answer_json(result))

    @bentoml.api
    async def explain(self, image: Path, class_name: str | None = None) -> Image.Image:
        """Grad-CAM overlay (PNG) for ``class_name``, or for the predicted class when it is not given."""
        names = list(self.spec.class_names)
        if class_name is not None and class_name not in names:
            return error_response(400, f"unknown class_name {class_name!r}; classes are {names}")  # type: ignore[return-value]
        prepared = await self._prepared(image)
        if isinstance(prepared, JSONResponse):
            return prepared  # type: ignore[return-value]
        pixels = prepared.pixels
        if class_name is None:
            probabilities, _ = one_path.unpack((await self._backend_call("classify", pixels=pixels[None]))[0])
            index = int(np.argmax(probabilities))
        else:
            index = names.index(class_name)
        overlay = await self._backend_call("explain", pixels=pixels[None], class_index=index)
        return Image.fromarray(np.asarray(overlay, dtype=np.uint8), mode="RGB")

    @metadata_app.get("/metadata")
    async def metadata(self) -> dict[str, Any]:
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
            "metrics": one_path.json_safe(spec.metrics),
            "operating_point": one_path.json_safe(asdict(spec.operating_point)) if spec.operating_point else None,
            "temperature": spec.temperature,  # null: pushed before calibration, probabilities served as the model gives them
            "ood_gate": "on" if spec.ood else "unavailable",
            "ood": one_path.json_safe(asdict(spec.ood)) if spec.ood else None,
            "input_gate": {"warn": sorted(self.policy.warn)},
            "model_card": one_path.json_safe(self.card),
            "serving": {
                **await self._backend_call("served"),  # runtime, precision, threads of a model worker
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

    async def _prepared(self, image: Path) -> one_path.Prepared | JSONResponse:
        """The upload decoded and checked (``xray.serving.predict.prepare``), or the 4xx answer saying why not."""
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
                one_path.prepare, data, self.spec, self.policy, SETTINGS.max_pixels, limiter=self._decode_limiter
            )
        except ImageTooLargeError as exc:
            return error_response(413, str(exc))
        except UnsupportedImageFormat as exc:
            return error_response(415, str(exc))
        except Exception as exc:  # noqa: BLE001 - anything the decoder trips over is the input's fault
            logger.info("undecodable upload: %s: %s", type(exc).__name__, exc)
            message = str(exc) if isinstance(exc, ValueError) else f"not a readable image ({type(exc).__name__})"
            return error_response(400, message)


XrayClassifier.add_asgi_middleware(
    ServeTokenGuard, tokens=SETTINGS.serve_tokens, routes=("/predict", "/explain", "/metrics", "/metadata")
)
XrayClassifier.add_asgi_middleware(
    UploadGuard, max_bytes=SETTINGS.max_upload_bytes, upload_routes=("/predict", "/explain"), file_field="image"
)
