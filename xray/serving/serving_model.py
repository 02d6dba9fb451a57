"""The servable model: what the pusher writes into BentoML's store and what serving loads.

A model directory holds ``weights.pt`` (a state_dict), ``model.json``
(architecture, classes, preprocessing, provenance, the operating point, the
calibration temperature and the OOD threshold) and, where the model has an
OOD score, ``ood_stats.npz`` (its class means and precision matrices, whose
sha256 ``model.json`` records and serving checks like the weights'). Serving, the pusher's
re-scoring of production and the app's predict page all load it here, so
they cannot disagree on preprocessing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xray.entity.artifact_entity import OODGate, OperatingPoint, RuntimeExport
from xray.entity.config_entity import DEFAULT_MODEL_NAME, InputGateConfig
from xray.errors import XrayError
from xray.serving.inference import (
    apply_temperature,
    choose_device,
    choose_precision,
    predict_proba,
    predict_proba_and_features,
    prepare_model,
)
from xray.models.ood import OODDetector
from xray.serving.runtime import Session, open_session, runtime_choice, session_proba_and_features
from xray.models.builders import build_ensemble, build_model, load_checkpoint
from xray.data.preprocessing import Preprocessing
from xray.typed import from_mapping, to_jsonable

logger = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
SPEC = "model.json"
CARD = "model_card.json"  # the run's model card, copied in so it travels with the weights


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    run_id: str
    data_fingerprint: str
    weights_sha256: str
    metrics: dict[str, Any]
    operating_point: OperatingPoint | None = None  # threshold on P(positive) chosen on validation
    members: tuple[str, ...] = ()  # architecture "ensemble": the members' architectures, in state_dict order
    tta: tuple[str, ...] = ()  # test-time views averaged with the plain image (chosen on validation)
    seal_digest: str | None = None  # the run's evidence seal the model was pushed on (``xray runs verify``)
    temperature: float | None = None  # temperature scaling fitted on validation; None: pushed before calibration
    ood: OODGate | None = None  # the OOD score's threshold and statistics file; None: pushed before the OOD gate
    input_gate: InputGateConfig | None = None  # the run's input checks config; None: pushed before them (defaults)
    export: RuntimeExport | None = None  # the ONNX graphs made at push and their checks; None: eager PyTorch only


@dataclass(frozen=True)
class ModelScores:
    """What the model says about a batch: calibrated probabilities ``N×C`` and OOD scores ``N`` (NaN: no OOD gate)."""

    probabilities: np.ndarray
    ood_scores: np.ndarray


@dataclass(frozen=True)
class LoadedModel:
    """``model`` is the fp32 original (Grad-CAM needs fp32 gradients); predictions go through
    ``inference_model``, a bf16 copy where bf16 was chosen on a CPU: bf16 weights skip the
    per-call weight casts of autocast (faster: docs/benchmarks.md)."""

    spec: ModelSpec
    model: nn.Module
    inference_model: nn.Module
    device: torch.device
    precision: str  # fp32 | bf16 (eager), or the served graph's: fp32 | int8
    tag: str = ""
    ood: OODDetector | None = None
    session: Session | None = None  # the ONNX graph's runtime session, where one serves (xray.serving.runtime)

    @property
    def runtime(self) -> str:
        return self.session.runtime if self.session is not None else "torch"

    def predict_proba(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The model's own probabilities (before calibration), as evaluation scored them."""
        return predict_proba(
            self.inference_model, pixels, self.spec.preprocessing, self.device,
            precision=self.precision, batch_size=batch_size, tta=self.spec.tta,
        )

    def calibrated_proba(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The probabilities serving answers: ``predict_proba`` at the shipped temperature."""
        return apply_temperature(self.predict_proba(pixels, batch_size), self.spec.temperature)

    def scores(self, pixels: np.ndarray, batch_size: int = 64) -> ModelScores:
        """Calibrated probabilities and the OOD score from one forward pass (the OOD score reads features)."""
        if self.session is not None:
            probs, features = session_proba_and_features(
                self.session, pixels, self.spec.preprocessing, self.spec.tta, batch_size
            )
        elif self.ood is None:
            return ModelScores(self.calibrated_proba(pixels, batch_size), np.full(len(pixels), np.nan))
        else:
            probs, features = predict_proba_and_features(
                self.inference_model, pixels, self.spec.preprocessing, self.device,
                precision=self.precision, batch_size=batch_size, tta=self.spec.tta,
            )
        if self.ood is None:
            return ModelScores(apply_temperature(probs, self.spec.temperature), np.full(len(pixels), np.nan))
        return ModelScores(apply_temperature(probs, self.spec.temperature), self.ood.scores(features))


def write_model_dir(
    path: Path, spec: ModelSpec, checkpoint: Path, card: Path | None = None, ood_stats: Path | None = None,
    export_dir: Path | None = None,
) -> None:
    """Copy the checkpoint (OOD statistics, ONNX graphs) byte for byte, so they match the sha256s in ``spec``."""
    shutil.copyfile(checkpoint, path / WEIGHTS)
    for graph in spec.export.graphs if spec.export is not None else ():
        if export_dir is None:
            raise XrayError(f"{SPEC} names the ONNX graph {graph.file} but no export folder was given")
        shutil.copyfile(export_dir / graph.file, path / graph.file)
    if spec.ood is not None:
        if ood_stats is None:
            raise XrayError(f"{SPEC} names OOD statistics {spec.ood.file} but none were given")
        shutil.copyfile(ood_stats, path / spec.ood.file)
    (path / SPEC).write_text(json.dumps(to_jsonable(spec), indent=2) + "\n")
    if card is not None:
        shutil.copyfile(card, path / CARD)


def read_card(path: Path) -> dict[str, Any] | None:
    """The model card pushed with the model; None for models pushed before cards existed."""
    file = Path(path) / CARD
    return json.loads(file.read_text()) if file.is_file() else None


def read_spec(path: Path) -> ModelSpec:
    return from_mapping(ModelSpec, json.loads((Path(path) / SPEC).read_text()))


def build_for_spec(spec: ModelSpec) -> nn.Module:
    """An untrained model of the spec's shape: one architecture, or an ensemble of its members."""
    if spec.members:  # the candidates' ensemble, or one candidate's k-fold bag
        return build_ensemble(spec.members, len(spec.class_names), spec.preprocessing.channels)
    return build_model(spec.architecture, len(spec.class_names), spec.preprocessing.channels)


class ModelIntegrityError(XrayError):
    """The weights on disk are not the weights that were pushed: serving refuses them."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:  # hashlib, not xray.pipeline.store: the Bento packs only what serving imports
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_weights(
    path: Path, spec: ModelSpec, metadata_sha256: str | None, tag: str = "", metadata_ood_sha256: str | None = None
) -> None:
    """Refuse weights (or OOD statistics) whose sha256 differs from the model's metadata and its model.json.

    A store entry whose metadata names OOD statistics but whose model.json has
    none (the gate edited out) is refused too.
    """
    actual = _sha256(path / WEIGHTS)
    name = tag or str(path)
    if metadata_ood_sha256 is not None and (spec.ood is None or spec.ood.sha256 != metadata_ood_sha256):
        raise ModelIntegrityError(f"refusing model {name}: its metadata names OOD statistics that {SPEC} does not")
    if spec.ood is not None:
        stats = path / spec.ood.file
        if Path(spec.ood.file).name != spec.ood.file or not stats.is_file():
            raise ModelIntegrityError(f"refusing model {name}: {SPEC} names OOD statistics {spec.ood.file}, which are missing")
        if (digest := _sha256(stats)) != spec.ood.sha256:
            raise ModelIntegrityError(
                f"refusing model {name}: {spec.ood.file} has sha256 {digest[:16]}…, {SPEC} says {spec.ood.sha256[:16]}…"
            )
    for graph in spec.export.graphs if spec.export is not None else ():
        file = path / graph.file
        if Path(graph.file).name != graph.file or not file.is_file():
            raise ModelIntegrityError(f"refusing model {name}: {SPEC} names the ONNX graph {graph.file}, which is missing")
        if (digest := _sha256(file)) != graph.sha256:
            raise ModelIntegrityError(
                f"refusing model {name}: {graph.file} has sha256 {digest[:16]}…, {SPEC} says {graph.sha256[:16]}…"
            )
    if metadata_sha256 is not None and actual != metadata_sha256:
        raise ModelIntegrityError(
            f"refusing model {name}: {WEIGHTS} has sha256 {actual[:16]}…, its metadata says {metadata_sha256[:16]}…"
        )
    if actual != spec.weights_sha256:
        raise ModelIntegrityError(
            f"refusing model {name}: {WEIGHTS} has sha256 {actual[:16]}…, {SPEC} says {spec.weights_sha256[:16]}…"
        )


def load_model_dir(
    path: Path, precision: str = "fp32", tag: str = "", metadata_sha256: str | None = None,
    metadata_ood_sha256: str | None = None, runtime: str = "torch", threads: int = 0,
) -> LoadedModel:
    """``precision``: fp32 (the reference), bf16 or auto (bf16 where the hardware has it), for eager PyTorch.

    ``runtime``: torch (eager), onnxruntime, openvino, or auto (the one measured fastest here,
    ``xray.serving.runtime.runtime_choice``); an ONNX runtime serves the push's checked graph, int8 where it
    passed its check and measured faster, and falls back to eager PyTorch for a model with no servable graph.
    ``threads``: the runtime's threads (0: torch's count). ``metadata_sha256`` (``metadata_ood_sha256``): the
    weights' (OOD statistics') sha256 in the store's metadata; the files must match it.
    """
    path = Path(path)
    spec = read_spec(path)
    check_weights(path, spec, metadata_sha256, tag, metadata_ood_sha256)
    model = build_for_spec(spec)
    load_checkpoint(model, path / WEIGHTS)
    device = choose_device()
    model = prepare_model(model, device).eval()
    precision = choose_precision(device, precision)
    inference_model = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" and device.type == "cpu" else model
    ood = OODDetector.load(path / spec.ood.file) if spec.ood is not None else None
    session = _session_for(path, spec, runtime, threads or torch.get_num_threads(), tag or str(path)) if device.type == "cpu" else None
    if session is not None:
        precision = session.precision
    return LoadedModel(spec, model, inference_model, device, precision, tag, ood, session)


def _session_for(path: Path, spec: ModelSpec, runtime: str, threads: int, name: str) -> Session | None:
    """The runtime session that serves ``spec``'s export here, or None for eager PyTorch (and why, in the log)."""
    if runtime == "torch":
        return None
    if spec.export is None:
        logger.info("serving %s on eager PyTorch: it was pushed without an ONNX export", name)
        return None
    candidates: tuple[tuple[str, str], ...] = ((runtime, "fp32"),)
    if runtime == "auto":
        choice = runtime_choice(threads)
        logger.info("%s", choice.describe())
        candidates = choice.ranked
    for candidate, precision in candidates:  # the fastest whose graph passed its check in that runtime
        if candidate == "torch":
            return None
        graph = spec.export.servable(precision, candidate)
        if graph is not None:
            return open_session(candidate, path / graph.file, threads, precision)
    logger.info("serving %s on eager PyTorch: no ONNX graph passed its check in %s", name, ", ".join(
        f"{candidate} {precision}" for candidate, precision in candidates))
    return None


def load_stored_model(tag: str, precision: str = "fp32") -> LoadedModel:
    """A model from BentoML's store, checked against the weights sha256 in its metadata."""
    import bentoml

    model = bentoml.models.get(tag)
    metadata = model.info.metadata
    return load_model_dir(
        Path(model.path), precision, str(model.tag), metadata.get("weights_sha256"), metadata.get("ood_stats_sha256")
    )


def production_model_dir(model_name: str = DEFAULT_MODEL_NAME) -> tuple[str, Path] | None:
    """The production model: what the pointer in ``xray.audit.registry`` names (only gated models get there)."""
    import bentoml
    from bentoml.exceptions import NotFound

    from xray.audit.registry import production_tag

    tag = production_tag(model_name)
    if tag is None:
        return None
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        logger.warning("production model %s is missing from the store", tag)
        return None
    return str(model.tag), Path(model.path)
