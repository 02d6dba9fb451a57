"""Predictions for the predict page: through the Bento service when one is configured, else in-process.

Either way the answer comes from the one predict path (``xray.serving.predict``)
and has the same shape (label, calibrated probabilities, the OOD score and
threshold, warnings, a Grad-CAM overlay). A refused input is a ``Refused``
(the page shows its reasons, the JSON endpoint answers 422 with them), every
problem with the upload a ``BadUpload`` (400/413/415), never a server error.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol

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


class Refused(ValueError):
    """The model will not judge this input: ``body`` is the 422 answer (refused, reasons, ood_score, ...)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("; ".join(f"{r.get('code')}: {r.get('message')}" for r in body.get("reasons", [])) or "refused")
        self.body = body


@dataclass(frozen=True)
class PredictionResult:
    label: str
    probabilities: dict[str, float]  # class -> calibrated probability, in the model's class order
    model: str  # the model tag
    source: str  # where the answer came from, for the page
    gradcam_png: bytes | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_gate: str = "unavailable"  # on | unavailable (a model pushed before the OOD gate)
    warnings: tuple[dict[str, str], ...] = ()  # {code, message}: checks an operator turned into warnings


def result_from_answer(body: dict[str, Any], source: str, gradcam_png: bytes | None) -> PredictionResult:
    """An accepted answer's JSON (``xray.serving.predict.answer_json``, or the Bento's) -> the page's record."""
    return PredictionResult(
        label=str(body["label"]),
        probabilities={str(k): float(v) for k, v in body["probabilities"].items()},
        model=str(body.get("model", "")),
        source=source,
        gradcam_png=gradcam_png,
        ood_score=body.get("ood_score"),
        ood_threshold=body.get("ood_threshold"),
        ood_gate=str(body.get("ood_gate", "unavailable")),
        warnings=tuple({"code": str(w["code"]), "message": str(w["message"])} for w in body.get("warnings", [])),
    )


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
        overlay = explain.content if explain.headers.get("content-type", "").startswith("image/") else None
        try:
            return result_from_answer(prediction, f"Bento service at {self.url}", overlay)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PredictionUnavailable(
                f"the Bento service at {self.url} answered an unexpected shape: {exc}"
            ) from None

    def _post(self, client: httpx.Client, route: str, files: dict) -> httpx.Response:
        try:
            response = client.post(f"{self.url}{route}", files=files)
        except httpx.HTTPError as exc:
            raise PredictionUnavailable(f"the Bento service at {self.url} cannot be reached: {exc}") from None
        if response.status_code == 422 and _is_refusal(response):
            raise Refused(response.json())
        if 400 <= response.status_code < 500:
            raise BadUpload(_error_message(response), response.status_code)
        if response.status_code >= 300:
            raise PredictionUnavailable(
                f"the Bento service at {self.url} answered {response.status_code} on {route}: {_error_message(response)}"
            )
        return response


def _is_refusal(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("refused") is True


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

    def _model(self):  # -> (tag, LoadedModel, Policy)
        from xray.serving.predict import Policy
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
                loaded = load_stored_model(tag, "fp32")
            except ModelIntegrityError as exc:
                raise PredictionUnavailable(str(exc)) from None
            self._loaded = (tag, loaded, Policy.for_model(loaded.spec))
        return self._loaded

    def predict(self, data: bytes, filename: str, content_type: str | None) -> PredictionResult:
        from xray.data.preprocessing import DEFAULT_MAX_PIXELS
        from xray.serving import predict as one_path

        max_pixels = self.max_pixels or DEFAULT_MAX_PIXELS
        with self._lock:
            try:
                tag, loaded, policy = self._model()
            except PredictionUnavailable:
                _judge_upload(data, max_pixels)  # a bad upload is the caller's 4xx even without a model
                raise
            try:  # the same decode, checks and model pass as the Bento (xray.serving.predict)
                prepared = one_path.prepare(data, loaded.spec, policy, max_pixels)
            except Exception as exc:  # noqa: BLE001 - anything the decoder trips over is the input's fault
                raise _bad_upload(exc) from None
            scores = loaded.scores(prepared.pixels[None])
            result = one_path.answer(loaded.spec, tag, prepared, scores.probabilities[0], scores.ood_scores[0], policy)
            body = one_path.answer_json(result)
            if isinstance(result, one_path.Refusal):
                raise Refused(body)
            from xray.evaluation.explain import gradcam_overlays  # heavy (grad-cam): only once the upload is usable

            index = list(loaded.spec.class_names).index(result.label)
            overlay = gradcam_overlays(loaded.model, prepared.pixels[None], loaded.spec.preprocessing, [index])[0]
        return result_from_answer(body, "the production model, loaded in-process", png_bytes(overlay))


def _judge_upload(data: bytes, max_pixels: int) -> None:
    from xray.data.preprocessing import ImageDecodeError
    from xray.serving.predict import decode

    try:
        decode(data, max_pixels)
    except ImageDecodeError as exc:
        raise _bad_upload(exc) from None


def _bad_upload(exc: Exception) -> BadUpload:
    from xray.data.preprocessing import ImageDecodeError, ImageTooLargeError, UnsupportedImageFormat

    if not isinstance(exc, ImageDecodeError):
        logger.info("undecodable upload: %s: %s", type(exc).__name__, exc)
        return BadUpload(str(exc) if isinstance(exc, ValueError) else f"not a readable image ({type(exc).__name__})")
    status = 415 if isinstance(exc, UnsupportedImageFormat) else 413 if isinstance(exc, ImageTooLargeError) else 400
    return BadUpload(re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)), status)


def make_predictor(bento_url: str | None, model_name: str) -> Predictor:
    return BentoPredictor(bento_url) if bento_url else LocalPredictor(model_name)


def check_upload(data: bytes, max_bytes: int) -> None:
    if not data:
        raise BadUpload("the uploaded file is empty: choose a PNG, JPEG or DICOM radiograph")
    if len(data) > max_bytes:
        raise BadUpload(f"the upload is larger than the limit of {max_bytes} bytes", 413)
