"""The one predict path: what ``/predict`` answers, in the Bento, the app's in-process fallback and MLflow.

bytes -> decode once -> input checks -> model (calibrated probabilities and
the OOD score, one forward pass) -> operating point -> a ``Prediction`` or a
``Refusal``. The Bento runs the steps in two processes (``prepare`` in the
front service, ``LoadedModel.scores`` in the batching model service,
``answer`` back in front); ``predict`` runs them in one (the app, the MLflow
pyfunc, and the evaluation stage's OOD suite), so all four answer alike.

A refusal names its reasons with machine-readable codes: the input checks'
(``xray.data.quality``) and ``ood_score`` for the model's own score.
Operators may turn any code into a warning (``input_gate`` in the pushed
model's config, or ``XRAY_INPUT_GATE_WARN`` at serving); a warning is
answered and logged, never dropped. A model pushed before the OOD gate
existed answers ``ood_gate: "unavailable"`` and no score: nothing is faked.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xray.data.preprocessing import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, fit_to_contract
from xray.data.quality import DICOM_CHECKS, IMAGE_CHECKS, Finding, check_decoded, model_side
from xray.entity.config_entity import InputGateConfig
from xray.errors import ConfigError
from xray.evaluation.operating_point import positive_indices
from xray.serving.serving_model import LoadedModel, ModelScores, ModelSpec

logger = logging.getLogger(__name__)

OOD_REASON = "ood_score"  # the reason code of the model's own out-of-distribution score
WARN_ENV = "XRAY_INPUT_GATE_WARN"


@dataclass(frozen=True)
class Reason:
    """Why an input was refused (or, for a warning, why it would have been)."""

    code: str
    message: str


@dataclass(frozen=True)
class OperatingPointAnswer:
    """The shipped threshold and where this image falls: ``positive`` is ``score >= threshold``."""

    positive_classes: tuple[str, ...]
    threshold: float
    score: float  # P(positive): the summed calibrated probability of the positive classes
    target_sensitivity: float


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]  # calibrated, in the model's class order
    model: str
    positive: bool | None = None  # at the operating point; None when the model ships none
    operating_point: OperatingPointAnswer | None = None
    ood_score: float | None = None  # None: the model ships no OOD score (ood_gate "unavailable")
    ood_threshold: float | None = None
    ood_gate: str = "unavailable"  # on | unavailable
    warnings: tuple[Reason, ...] = ()
    refused: bool = False


@dataclass(frozen=True)
class Refusal:
    """No label: the input is not one the model can judge (HTTP 422)."""

    reasons: tuple[Reason, ...]
    model: str
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_gate: str = "unavailable"
    warnings: tuple[Reason, ...] = ()
    refused: bool = True


Answer = Prediction | Refusal


@dataclass(frozen=True)
class Policy:
    """Which reason codes are only warnings: the pushed model's ``input_gate`` and ``XRAY_INPUT_GATE_WARN``."""

    warn: frozenset[str] = field(default_factory=frozenset)
    gate_config: InputGateConfig = field(default_factory=InputGateConfig)

    @classmethod
    def for_model(cls, spec: ModelSpec, env: Mapping[str, str] = os.environ) -> Policy:
        """The model's own ``input_gate`` config (the defaults for a model pushed before it), with the
        environment's warn list on top; an unknown code there is a ``ConfigError`` naming it."""
        raw = env.get(WARN_ENV, "")
        codes = frozenset(code.strip() for code in raw.split(",") if code.strip())
        unknown = sorted(codes - known_codes())
        if unknown:
            raise ConfigError(f"{WARN_ENV} names unknown check {unknown[0]!r} (known: {', '.join(sorted(known_codes()))})")
        return cls(warn=codes, gate_config=spec.input_gate or InputGateConfig())


def known_codes() -> frozenset[str]:
    """Every reason code an answer can carry: the input checks' and the model's OOD score."""
    return frozenset((*IMAGE_CHECKS, *DICOM_CHECKS, OOD_REASON))


@dataclass(frozen=True)
class Prepared:
    """An upload decoded once: the model's ``S×S`` pixels and the input checks' findings."""

    pixels: np.ndarray
    findings: tuple[Finding, ...]


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> DecodedImage:
    """The one decode (``ImageDecodeError`` and subclasses for a bad upload); needs no model."""
    return decode_image(data, max_pixels, draft_size=draft_size)


def check(decoded: DecodedImage, spec: ModelSpec, policy: Policy) -> Prepared:
    """The input checks (``xray.data.quality``) on the decoded film, and its pixels fitted to the model's contract."""
    contract = spec.preprocessing
    findings = check_decoded(decoded, policy.gate_config, model_side(contract))
    return Prepared(fit_to_contract(decoded.grey, contract.image_size, contract), tuple(findings))


def prepare(data: bytes, spec: ModelSpec, policy: Policy, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """``decode`` then ``check``: what the Bento's front service runs before the model."""
    contract = spec.preprocessing
    return check(decode(data, max_pixels, draft_size=contract.source_size or contract.image_size), spec, policy)


def answer(spec: ModelSpec, tag: str, prepared: Prepared, probabilities: np.ndarray, ood_score: float, policy: Policy) -> Answer:
    """Findings and the OOD score -> a refusal with its reasons, or the prediction with its warnings."""
    findings = list(prepared.findings)
    threshold = spec.ood.threshold if spec.ood is not None else None
    score = float(ood_score) if threshold is not None and math.isfinite(ood_score) else None
    if score is not None and score > threshold:
        findings.append(Finding(
            OOD_REASON,
            f"the model's out-of-distribution score {score:.4g} is above its threshold {threshold:.4g}: "
            "this input is unlike the films it was trained on",
            "refuse",
        ))
    refusals = tuple(Reason(f.code, f.message) for f in findings if f.action == "refuse" and f.code not in policy.warn)
    warnings = tuple(Reason(f.code, f.message) for f in findings if not (f.action == "refuse" and f.code not in policy.warn))
    gate = "on" if threshold is not None else "unavailable"
    if warnings:
        logger.warning("%s: answered with warnings: %s", tag, "; ".join(f"{w.code}: {w.message}" for w in warnings))
    if refusals:
        logger.info("%s: refused: %s", tag, ", ".join(r.code for r in refusals))
        return Refusal(refusals, tag, score, threshold, gate, warnings)
    return _prediction(spec, tag, probabilities, score, threshold, gate, warnings)


def _prediction(
    spec: ModelSpec, tag: str, probabilities: np.ndarray, score: float | None, threshold: float | None,
    gate: str, warnings: tuple[Reason, ...],
) -> Prediction:
    names, point, op = spec.class_names, spec.operating_point, None
    if point is not None:
        positive = float(np.sum(probabilities[list(positive_indices(point.positive, names))]))
        op = OperatingPointAnswer(tuple(point.positive), point.threshold, positive, point.target_sensitivity)
    return Prediction(
        label=names[int(np.argmax(probabilities))],
        probabilities={name: float(p) for name, p in zip(names, probabilities)},
        model=tag, positive=None if op is None else op.score >= op.threshold, operating_point=op,
        ood_score=score, ood_threshold=threshold, ood_gate=gate, warnings=warnings,
    )


def pack(scores: ModelScores) -> np.ndarray:
    """The model service's batchable answer: float32 ``N×(C+1)``, the OOD score (NaN: none) last."""
    return np.concatenate([scores.probabilities, scores.ood_scores[:, None]], axis=1).astype(np.float32)


def unpack(row: np.ndarray) -> tuple[np.ndarray, float]:
    row = np.asarray(row, dtype=np.float64)
    return row[:-1], float(row[-1])


def predict(
    loaded: LoadedModel, data: list[bytes], policy: Policy, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Answer | Exception]:
    """In-process: every upload through the same steps as the Bento; one model pass for the decodable ones.

    An upload that cannot be decoded gives its ``ImageDecodeError`` in its place, for the caller to report.
    """
    prepared: list[Prepared | Exception] = []
    for item in data:
        try:
            prepared.append(prepare(item, loaded.spec, policy, max_pixels))
        except Exception as exc:  # noqa: BLE001 - any decode failure is that upload's answer
            prepared.append(exc)
    usable = [p for p in prepared if isinstance(p, Prepared)]
    scores = loaded.scores(np.stack([p.pixels for p in usable])) if usable else None
    answers: list[Answer | Exception] = []
    index = 0
    for item in prepared:
        if isinstance(item, Exception):
            answers.append(item)
            continue
        answers.append(answer(loaded.spec, loaded.tag, item, scores.probabilities[index], scores.ood_scores[index], policy))
        index += 1
    return answers


def json_safe(value: Any) -> Any:
    """NaN/inf (an undefined ROC-AUC, say) -> null: strict JSON encoders refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def answer_json(result: Answer) -> dict[str, Any]:
    """The documented JSON of an answer (docs/input-gate.md); a refusal is sent with HTTP 422."""
    from dataclasses import asdict

    body = json_safe(asdict(result))
    return {"refused": body.pop("refused"), **body}
