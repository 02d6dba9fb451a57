"""Predictions for the predict page: through the Bento service when one is configured, else in-process.

Either way the answer is the same shape (label, probabilities, a Grad-CAM
overlay), and every problem with the upload is a ``BadUpload`` (the page
shows it, the JSON endpoint answers 400), never a server error.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import dataclass
from typing import Protocol

import httpx
import numpy as np

logger = logging.getLogger(__name__)


class BadUpload(ValueError):
    """The upload is not an image the model can read: the user's to fix (``status_code`` says how)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code

    status_code = 400


class PredictionUnavailable(RuntimeError):
    """No model to ask: none in production yet, or the Bento service is down."""


@dataclass(frozen=True)
class PredictionResult:
    label: str
    probabilities: dict[str, float]  # class -> probability, in the model's class order
    model: str  # the model tag
    source: str  # where the answer came from, for the page
    gradcam_png: bytes | None = None


class Predictor(Protocol):
    def predict(self, data: bytes, filename: str, content_type: str | None) -> PredictionResult: ...


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class BentoPredictor:
    """POST {url}/predict and {url}/explain with the multipart field ``image``."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def predict(self, data: bytes, filename: str, content_type: str | None) -> PredictionResult:
        files = {"image": (filename or "upload", data, content_type or "application/octet-stream")}
        with httpx.Client(timeout=self.timeout_s) as client:
            prediction = self._post(client, "/predict", files).json()
            explain = self._post(client, "/explain", files)
        try:
            label = str(prediction["label"])
            probabilities = {str(k): float(v) for k, v in prediction["probabilities"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PredictionUnavailable(
                f"the Bento service at {self.url} answered an unexpected shape: {exc}"
            ) from None
        overlay = explain.content if explain.headers.get("content-type", "").startswith("image/") else None
        return PredictionResult(
            label=label,
            probabilities=probabilities,
            model=str(prediction.get("model", "")),
            source=f"Bento service at {self.url}",
            gradcam_png=overlay,
        )

    def _post(self, client: httpx.Client, route: str, files: dict) -> httpx.Response:
        try:
            response = client.post(f"{self.url}{route}", files=files)
        except httpx.HTTPError as exc:
            raise PredictionUnavailable(f"the Bento service at {self.url} cannot be reached: {exc}") from None
        if 400 <= response.status_code < 500:
            raise BadUpload(_error_message(response), response.status_code)
        if response.status_code >= 300:
            raise PredictionUnavailable(
                f"the Bento service at {self.url} answered {response.status_code} on {route}: {_error_message(response)}"
            )
        return response


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict):
            return str(body.get("error") or body.get("detail") or body)
    except ValueError:
        pass
    return response.text[:300] or f"HTTP {response.status_code}"


class LocalPredictor:
    """The production model from the BentoML store, loaded in this process and reloaded when it changes."""

    def __init__(self, model_name: str, max_pixels: int | None = None) -> None:
        self.model_name = model_name
        self.max_pixels = max_pixels
        self._lock = threading.Lock()  # one inference at a time: Grad-CAM hooks the shared model
        self._loaded: tuple[str, object] | None = None

    def _model(self):  # -> (tag, LoadedModel)
        from xray.serving.serving_model import ModelIntegrityError, load_stored_model, production_model_dir

        found = production_model_dir(self.model_name)
        if found is None:
            raise PredictionUnavailable(
                f"no production model named {self.model_name!r} yet: train a run that passes the gate, "
                "or set XRAY_BENTO_URL to a running Bento service"
            )
        tag, _ = found
        if self._loaded is None or self._loaded[0] != tag:
            logger.info("loading production model %s for the predict page", tag)
            try:
                self._loaded = (tag, load_stored_model(tag, "fp32"))
            except ModelIntegrityError as exc:
                raise PredictionUnavailable(str(exc)) from None
        return self._loaded

    def predict(self, data: bytes, filename: str, content_type: str | None) -> PredictionResult:
        from xray.data.preprocessing import (
            DEFAULT_MAX_PIXELS,
            ImageDecodeError,
            ImageTooLargeError,
            UnsupportedImageFormat,
            decode_grayscale,
            fit_to_contract,
        )

        try:  # the upload is judged before any model is needed: a bad one is the caller's 4xx either way
            grey, _ = decode_grayscale(data, self.max_pixels or DEFAULT_MAX_PIXELS)
        except ImageDecodeError as exc:
            status = 400
            if isinstance(exc, (UnsupportedImageFormat, ImageTooLargeError)):
                status = 415 if isinstance(exc, UnsupportedImageFormat) else 413
            raise BadUpload(re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)), status) from None
        from xray.evaluation.explain import gradcam_overlays  # heavy (grad-cam): only once the upload is usable

        with self._lock:
            tag, loaded = self._model()
            spec = loaded.spec
            pixels = fit_to_contract(grey, spec.preprocessing.image_size, spec.preprocessing)
            probabilities = loaded.predict_proba(pixels[None])[0]
            index = int(np.argmax(probabilities))
            overlay = gradcam_overlays(loaded.model, pixels[None], spec.preprocessing, [index])[0]
        return PredictionResult(
            label=spec.class_names[index],
            probabilities={name: float(p) for name, p in zip(spec.class_names, probabilities)},
            model=tag,
            source="the production model, loaded in-process",
            gradcam_png=png_bytes(overlay),
        )


def make_predictor(bento_url: str | None, model_name: str) -> Predictor:
    return BentoPredictor(bento_url) if bento_url else LocalPredictor(model_name)


def check_upload(data: bytes, max_bytes: int) -> None:
    if not data:
        raise BadUpload("the uploaded file is empty: choose a PNG, JPEG or DICOM radiograph")
    if len(data) > max_bytes:
        raise BadUpload(f"the upload is larger than the limit of {max_bytes} bytes", 413)
