"""Stage 4: score every candidate on validation and test, draw the report, pick the best.

The choice uses validation only (``evaluation.selection_metric``), so the
test numbers stay an honest estimate of what the chosen model will do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xray.evaluation import model_card
from xray.evaluation import plots
from xray.evaluation.bootstrap import bootstrap_intervals, subgroup_metrics
from xray.entity.artifact_entity import (
    Calibration,
    CandidateEvaluation,
    DataIngestionArtifact,
    DataTransformationArtifact,
    EnsembleDecision,
    ExternalCheck,
    ModelEvaluationArtifact,
    OODGate,
    OODSuiteKind,
    OperatingPoint,
    ModelTrainerArtifact,
    ShortcutCheck,
    SplitMetrics,
)
from xray.entity.config_entity import EvaluationConfig, PipelineConfig
from xray.evaluation.explain import gradcam_overlays
from xray.evaluation import selection
from xray.serving.inference import (
    TTA_VIEWS,
    apply_temperature,
    choose_device,
    predict_proba,
    predict_proba_and_features,
    prepare_model,
)
from xray.serving import predict as one_path
from xray.models.ood import OOD_FILE, OODDetector
from xray.serving.serving_model import LoadedModel, ModelSpec
from xray.evaluation.ood import fit_detector, refused_films, refused_text
from xray.evaluation.calibration import fit_temperature, reliability_curve
from xray.evaluation.metrics import compute_metrics, expected_calibration_error
from xray.models.builders import ENSEMBLE, flat_ensemble, load_candidate
from xray.evaluation.operating_point import operating_point, positive_indices
from xray.data.preprocessing import Preprocessing, preprocessing_of, resize_batch
from xray.evaluation import external as external_check
from xray.evaluation import shortcut
from xray.evaluation.external import ExternalFilms
from xray.data.snapshot import split_rows
from xray.pipeline.stage import Inputs, StageContext
from xray.pipeline.store import RunDir, fingerprint as fingerprint_of, new_header, sha256_file, stage_code_hash
from xray.typed import to_jsonable

logger = logging.getLogger(__name__)

STAGE = "model_evaluation"
CACHED = True


def fingerprint(config: PipelineConfig, inputs: Inputs) -> str:
    """The evaluation settings and the input checks (the OOD suite runs through them), the data and the models."""
    upstream = [inputs.get(DataTransformationArtifact).header.fingerprint, inputs.get(ModelTrainerArtifact).header.fingerprint]
    params = {"evaluation": to_jsonable(config.evaluation), "input_gate": to_jsonable(config.input_gate)}
    if config.evaluation.external:  # the films themselves, so a changed external folder is scored again
        params["external_files"] = external_check.listing(config.evaluation.external)
    return fingerprint_of(STAGE, params, upstream, stage_code_hash(__name__))


def check_class_maps(config: PipelineConfig, class_names: tuple[str, ...]) -> None:
    """Run once the data's classes are known, before training: external class maps and per-class gates name real classes."""
    external_check.check_class_maps(config.evaluation, config.gate, class_names)


@dataclass(frozen=True)
class _Choice:
    """The chosen candidate and why: on validation, or on the cross-validated means."""

    best: CandidateEvaluation
    basis: str  # validation | cross_validation
    cv_stats: dict[str, dict[str, float]]
    ensemble: EnsembleDecision | None


def run(ctx: StageContext, inputs: Inputs) -> ModelEvaluationArtifact:
    cfg, run_dir = ctx.config.evaluation, ctx.run
    ingestion, transformation = inputs.get(DataIngestionArtifact), inputs.get(DataTransformationArtifact)
    trainer = inputs.get(ModelTrainerArtifact)
    out = run_dir.stage_dir(STAGE)
    classes = transformation.class_names
    preprocessing = preprocessing_of(transformation, trainer.architecture_input["image_size"])
    arrays = {k: transformation.load_array(run_dir.path, k) for k in transformation.arrays if not k.startswith("train")}
    arrays = {k: resize_batch(v, preprocessing.image_size) if k.endswith("_x") else v for k, v in arrays.items()}
    scorer = _Scorer(arrays, preprocessing, choose_device(), classes, cfg)
    models = _score_models(scorer, trainer, run_dir, out, cfg)
    external_films = external_check.load_external(cfg.external, classes, preprocessing) if cfg.external else None
    if external_films is not None:
        scorer.score_external(models, external_films)
    evaluations = _with_confusion_plots(scorer, classes, run_dir, out)
    files = [out / f"confusion_{e.name}.png" for e in evaluations] + ([out / f"{ENSEMBLE}.pt"] if ENSEMBLE in models else [])
    choice = _choose(evaluations, trainer, scorer, cfg)
    best = choice.best
    report_plots = _report_plots(trainer, scorer, models[best.name], best.name, cfg, choice.cv_stats, out)
    shortcuts = _shortcut_check(run_dir, ingestion, transformation, models[best.name], scorer)
    clinical = _clinical_evidence(ctx.config, run_dir, ingestion, transformation, arrays, scorer.val_probs[best.name], scorer.test_probs[best.name])
    ood_gate, detector = _fit_ood(scorer, models[best.name], transformation, run_dir, out, external_films)
    suite = _score_ood_suite(ctx, scorer, transformation, models[best.name], best, clinical["operating_point"], ood_gate, detector)
    files += [run_dir.path / ood_gate.file] if ood_gate else []
    card = model_card.build_card(
        run_dir.run_id, best.name, ingestion, transformation, clinical["intervals"], clinical["bootstrap"],
        clinical["operating_point"], clinical["subgroups"], f"{choice.basis.replace('_', '-')} {cfg.selection_metric}",
        calibration=best.calibration, ood=ood_gate, ood_suite=suite,
    )
    card_json, card_md = model_card.write_card(model_card.with_generalization(card, best.external, shortcuts), out)
    table_md, table_json = _comparison(
        evaluations, trainer, best.name, cfg.selection_metric, out, choice.cv_stats, choice.ensemble, shortcuts,
        ood=(ood_gate, suite),
    )
    files += [card_json, card_md] + [p for k, p in report_plots.items() if k != "confusion_matrix"] + [table_md, table_json]
    logger.info("best candidate by %s %s: %s", choice.basis.replace("_", "-"), cfg.selection_metric, best.name)
    return ModelEvaluationArtifact(
        header=new_header(
            run_dir, ModelEvaluationArtifact, STAGE, ctx.fingerprint,
            parents=[transformation.header.artifact_id, trainer.header.artifact_id], files=files,
        ),
        selection_metric=cfg.selection_metric, best_candidate=best.name, best_checkpoint=best.checkpoint,
        candidates=tuple(evaluations), comparison_markdown=run_dir.relative(table_md),
        comparison_json=run_dir.relative(table_json), plots={k: run_dir.relative(p) for k, p in report_plots.items()},
        gradcam=(run_dir.relative(report_plots["gradcam"]),) if "gradcam" in report_plots else (),
        selection_basis=choice.basis, cross_validation=choice.cv_stats, **clinical,
        model_card_json=run_dir.relative(card_json), model_card_markdown=run_dir.relative(card_md),
        image_size=preprocessing.image_size, ensemble=choice.ensemble, shortcut=shortcuts,
        ood=ood_gate, ood_suite=suite,
    )


def _score_models(
    scorer: _Scorer, trainer: ModelTrainerArtifact, run_dir: RunDir, out: Path, cfg: EvaluationConfig
) -> dict[str, nn.Module]:
    """Every candidate's checkpoint, and their ensemble when there are two or more, scored on val and test."""
    models: dict[str, nn.Module] = {}
    for candidate in trainer.candidates:
        models[candidate.name] = prepare_model(load_candidate(candidate, run_dir.path, len(scorer.classes)), scorer.device)
        scorer.add(candidate.name, models[candidate.name], candidate.checkpoint, members=candidate.members)
    if cfg.ensemble != "off" and len(trainer.candidates) >= 2:
        candidates = tuple(c.name for c in trainer.candidates)
        ensemble = flat_ensemble([models[n] for n in candidates], candidates)
        names = ensemble.names
        checkpoint = out / f"{ENSEMBLE}.pt"
        torch.save({k: v.detach().cpu() for k, v in ensemble.state_dict().items()}, checkpoint)
        models[ENSEMBLE] = ensemble
        scorer.add(ENSEMBLE, ensemble, run_dir.relative(checkpoint), members=names)
    return models


def _shortcut_check(
    run_dir: RunDir, ingestion: DataIngestionArtifact, transformation: DataTransformationArtifact, model: nn.Module,
    scorer: _Scorer,
) -> ShortcutCheck | None:
    """Both shortcut probes on train+val (xray/evaluation/shortcut.py): acquisition features, and the lungs masked."""
    pixels, labels, paths = _train_val_films(run_dir, ingestion, transformation)
    keep = shortcut.subsample(labels)
    pixels, labels, paths = pixels[keep], labels[keep], [paths[i] for i in keep]
    n = len(scorer.classes)
    acquisition = shortcut.acquisition_probe(paths, pixels, labels, n)
    masked = shortcut.masked_probe(
        lambda films: predict_proba(model, films, scorer.preprocessing, scorer.device),
        resize_batch(pixels, scorer.preprocessing.image_size), labels, n,
    )
    check = shortcut.shortcut_check([acquisition, masked], scorer.cfg.shortcut_warn)
    if check is None:
        logger.info("shortcut check: skipped, a class has fewer than two train+val films")
        return None
    logger.log(
        logging.WARNING if check.warning else logging.INFO, "shortcut check: %s (max %.3f, warn above %s)%s",
        ", ".join(f"{p.name} {p.score:.3f}" for p in check.probes), check.score, check.warn_at,
        f": {check.warning}" if check.warning else "",
    )
    return check


def _train_val_films(
    run_dir: RunDir, ingestion: DataIngestionArtifact, transformation: DataTransformationArtifact
) -> tuple[np.ndarray, np.ndarray, list[Path | None]]:
    """Train+val pixels (the cached arrays), labels, and each film's raw file (None for an .npz or a missing file)."""
    rows = split_rows(run_dir.path, transformation, "train", "val")
    root = ingestion.dataset_root(run_dir.path)
    paths: list[Path | None] = [None] * len(rows)
    if ingestion.source_kind != "npz":
        paths = [p if (p := root / r["ref"]).is_file() else None for r in rows]
    pixels = np.concatenate([transformation.load_array(run_dir.path, f"{s}_x") for s in ("train", "val")])
    labels = np.concatenate([transformation.load_array(run_dir.path, f"{s}_y") for s in ("train", "val")])
    return pixels, labels, paths


def _with_confusion_plots(scorer: _Scorer, classes: tuple[str, ...], run_dir: RunDir, out: Path) -> list[CandidateEvaluation]:
    evaluations = []
    for name, scores in scorer.scores.items():
        cm_path = plots.confusion_matrix_png(
            np.array(scores.test.confusion_matrix), classes, f"{name}: test", out / f"confusion_{name}.png"
        )
        evaluations.append(dataclasses.replace(scores, plots={"confusion_matrix": run_dir.relative(cm_path)}))
        logger.info(
            "%s%s: val auc %.4f acc %.4f | test auc %.4f acc %.4f%s",
            name, f" (tta: {', '.join(scores.tta)})" if scores.tta else "", scores.validation.roc_auc,
            scores.validation.accuracy, scores.test.roc_auc, scores.test.accuracy,
            _external_log(scores.external),
        )
    return evaluations


def _external_log(check: ExternalCheck | None) -> str:
    if check is None:
        return ""
    worst = check.worst()
    auc = f"auc {check.roc_auc:.4f}, " if check.roc_auc is not None else ""
    return f" | external {auc}worst recall {worst[1].recall:.4f} ({worst[0]} {worst[1].model_class})" if worst else ""


def _choose(evaluations: list[CandidateEvaluation], trainer: ModelTrainerArtifact, scorer: _Scorer, cfg: EvaluationConfig) -> _Choice:
    cv_stats = cross_validation_stats(trainer, cfg.selection_metric)
    cv_means = {name: stats["mean"] for name, stats in cv_stats.items()} or None
    members = [e for e in evaluations if e.name != ENSEMBLE]
    best = choose_best(members, cfg.selection_metric, cv_means)
    decision = None
    if len(members) < len(evaluations):
        decision = decide_ensemble(members, best, scorer.val_probs, scorer.arrays["val_y"], cfg, cv_means)
        if decision.chosen:
            best = next(e for e in evaluations if e.name == ENSEMBLE)
        logger.info("ensemble: %s", decision.reason)
    return _Choice(best, "cross_validation" if cv_means else "validation", cv_stats, decision)


def _report_plots(
    trainer: ModelTrainerArtifact, scorer: _Scorer, model: nn.Module, best: str, cfg: EvaluationConfig,
    cv_stats: dict[str, dict[str, float]], out: Path,
) -> dict[str, Path]:
    arrays, classes = scorer.arrays, scorer.classes
    report_plots = {
        "roc_curves": plots.roc_curves_png(arrays["test_y"], scorer.test_probs, classes, "ROC, test split", out / "roc_curves.png"),
        "training_curves": plots.training_curves_png({c.name: c.history for c in trainer.candidates}, out / "training_curves.png"),
        "confusion_matrix": out / f"confusion_{best}.png",
        "reliability": _reliability_plot(scorer, best, out),
    }
    gradcam = _gradcam_gallery(model, arrays, scorer.preprocessing, classes, cfg.gradcam_per_class, scorer.test_probs[best], out)
    if gradcam is not None:
        report_plots["gradcam"] = gradcam
    if cv_stats:
        fold_values = {c.name: tuple(getattr(f, cfg.selection_metric) for f in c.cv_fold_metrics) for c in trainer.candidates}
        report_plots["cv_folds"] = plots.folds_png(fold_values, cfg.selection_metric, out / "cv_folds.png")
    return report_plots


def _reliability_plot(scorer: _Scorer, best: str, out: Path) -> Path:
    """The chosen model's reliability curves, before and after temperature scaling, on validation and test."""
    calibration, bins = scorer.scores[best].calibration, scorer.cfg.calibration_bins
    curves: dict[str, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {}
    for split, name in (("val", "validation"), ("test", "test")):
        y, raw = scorer.arrays[f"{split}_y"], scorer.raw_probs[best][split]
        states = {"before": raw, f"after (T = {calibration.temperature:.3f})": apply_temperature(raw, calibration.temperature)}
        curves[name] = {}
        for state, probs in states.items():
            curve = reliability_curve(y, probs, bins)
            curves[name][state] = (curve.confidence, curve.accuracy)
    return plots.reliability_png(curves, f"{best}: reliability, before and after temperature scaling", out / "reliability.png")


class _Scorer:
    """Scores each model on validation and test with one TTA decision per model, made on validation."""

    def __init__(
        self, arrays: dict[str, np.ndarray], preprocessing: Preprocessing, device: torch.device,
        classes: tuple[str, ...], cfg: EvaluationConfig,
    ) -> None:
        self.arrays, self.preprocessing, self.device, self.classes, self.cfg = arrays, preprocessing, device, classes, cfg
        self.scores: dict[str, CandidateEvaluation] = {}
        self.val_probs: dict[str, np.ndarray] = {}  # calibrated: what serving answers
        self.test_probs: dict[str, np.ndarray] = {}
        self.raw_probs: dict[str, dict[str, np.ndarray]] = {}  # before calibration, per split

    def probs(self, model: nn.Module, pixels: np.ndarray, tta: tuple[str, ...]) -> np.ndarray:
        return predict_proba(model, pixels, self.preprocessing, self.device, tta=tta)

    def metrics(self, split: str, probs: np.ndarray) -> SplitMetrics:
        return compute_metrics(self.arrays[f"{split}_y"], probs, self.classes, self.cfg.calibration_bins)

    def add(self, name: str, model: nn.Module, checkpoint: str, members: tuple[str, ...] = ()) -> None:
        tta: tuple[str, ...] = TTA_VIEWS if self.cfg.tta == "on" else ()
        val = self.metrics("val", val_probs := self.probs(model, self.arrays["val_x"], tta))
        if self.cfg.tta == "auto":
            flipped = self.metrics("val", flipped_probs := self.probs(model, self.arrays["val_x"], TTA_VIEWS))
            if tta_helps(val, flipped, self.cfg.selection_metric):
                tta, val, val_probs = TTA_VIEWS, flipped, flipped_probs
        test_probs = self.probs(model, self.arrays["test_x"], tta)
        self.raw_probs[name] = {"val": val_probs, "test": test_probs}
        calibration = self.calibrate(val_probs, test_probs)
        self.val_probs[name] = apply_temperature(val_probs, calibration.temperature)
        self.test_probs[name] = apply_temperature(test_probs, calibration.temperature)
        self.scores[name] = CandidateEvaluation(
            name=name, validation=self.metrics("val", self.val_probs[name]), test=self.metrics("test", self.test_probs[name]),
            checkpoint=checkpoint, members=members, tta=tta, calibration=calibration,
        )

    def calibrate(self, val_probs: np.ndarray, test_probs: np.ndarray) -> Calibration:
        """Temperature scaling fitted on validation (``evaluation.calibration``), with ECE before and after."""
        val_y, test_y = self.arrays["val_y"], self.arrays["test_y"]
        method = self.cfg.calibration
        temperature = fit_temperature(val_probs, val_y) if method == "temperature" else 1.0

        def ece(y: np.ndarray, probs: np.ndarray) -> float:
            return expected_calibration_error(y, probs, self.cfg.calibration_bins)

        return Calibration(
            method=method, temperature=temperature,
            val_ece_before=ece(val_y, val_probs), val_ece_after=ece(val_y, apply_temperature(val_probs, temperature)),
            test_ece_before=ece(test_y, test_probs), test_ece_after=ece(test_y, apply_temperature(test_probs, temperature)),
        )

    def score_external(self, models: dict[str, nn.Module], films: ExternalFilms) -> None:
        """Every model on every external source, with its own TTA decision, as serving would answer."""
        for name, scores in self.scores.items():
            probs = apply_temperature(self.probs(models[name], films.pixels, scores.tta), scores.calibration.temperature)
            self.scores[name] = dataclasses.replace(scores, external=external_check.score_external(films, probs, self.classes))


def tta_helps(plain: SplitMetrics, with_tta: SplitMetrics, metric: str) -> bool:
    """Keep TTA only where validation improves: a higher selection metric, or the same and a lower loss."""
    a, b = plain.value(metric), with_tta.value(metric)
    return b > a or (b == a and with_tta.loss < plain.loss)


def decide_ensemble(
    members: list[CandidateEvaluation],
    best: CandidateEvaluation,
    val_probs: dict[str, np.ndarray],
    val_y: np.ndarray,
    cfg: EvaluationConfig,
    cv_means: dict[str, float] | None = None,
) -> EnsembleDecision:
    """The ensemble wins when a bootstrap over validation cannot tell the two best members apart."""
    runner_up = choose_best([e for e in members if e.name != best.name], cfg.selection_metric, cv_means)
    comparison = selection.compare(
        val_y, val_probs, best.name, runner_up.name, cfg.selection_metric, cfg.bootstrap_resamples, cfg.bootstrap_level
    )
    interval = (
        f"{best.name} - {runner_up.name} validation {comparison.metric} = {comparison.difference:+.4f}, "
        f"{comparison.level:.0%} bootstrap interval [{comparison.low:+.4f}, {comparison.high:+.4f}] over {comparison.resamples} resamples"
    )
    if cfg.ensemble == "always":
        chosen, reason = True, f"evaluation.ensemble=always ({interval})"
    elif comparison.cannot_tell:
        chosen, reason = True, f"chosen: validation cannot tell the best members apart ({interval} reaches 0)"
    else:
        chosen, reason = False, f"not chosen: {best.name} is better beyond resampling noise ({interval} excludes 0)"
    return EnsembleDecision(chosen=chosen, reason=reason, **dataclasses.asdict(comparison))



def _fit_ood(
    scorer: _Scorer, model: nn.Module, transformation: DataTransformationArtifact, run_dir: RunDir, out: Path,
    external: external_check.ExternalFilms | None = None,
) -> tuple[OODGate | None, OODDetector | None]:
    """The chosen model's Mahalanobis OOD score: fitted on training features, threshold on validation; what it
    accepts of test and of each external source is measured, not tuned on."""
    cfg = scorer.cfg
    if cfg.ood == "none":
        return None, None
    train_x = resize_batch(transformation.load_array(run_dir.path, "train_x"), scorer.preprocessing.image_size)
    train_y = transformation.load_array(run_dir.path, "train_y")
    features = {
        split: predict_proba_and_features(model, x, scorer.preprocessing, scorer.device)[1]
        for split, x in (("train", train_x), ("val", scorer.arrays["val_x"]), ("test", scorer.arrays["test_x"]))
    }
    detector = fit_detector(
        features["train"], train_y, features["val"], len(scorer.classes), cfg.ood_acceptance, cfg.ood_confidence
    )
    scores = {split: detector.scores(features[split]) for split in ("val", "test")}
    accepted = {split: float(np.mean(scores[split] <= detector.threshold)) for split in ("val", "test")}
    test_refused = refused_films(scores["test"], detector.threshold, split_rows(run_dir.path, transformation, "test"))
    external_accepted: dict[str, float] = {}
    if external is not None:
        kept = detector.scores(predict_proba_and_features(model, external.pixels, scorer.preprocessing, scorer.device)[1])
        kept = kept <= detector.threshold
        external_accepted = {s.name: float(np.mean(kept[external.source == i])) for i, s in enumerate(external.sources)}
    path = out / OOD_FILE
    detector.save(path)
    gate = OODGate(
        method=cfg.ood, acceptance=cfg.ood_acceptance, confidence=cfg.ood_confidence, threshold=detector.threshold,
        member_thresholds=tuple(m.threshold for m in detector.members),
        feature_dims=tuple(int(m.means.shape[1]) for m in detector.members),
        file=run_dir.relative(path), sha256=sha256_file(path),
        validation_accepted=accepted["val"], test_accepted=accepted["test"], external_accepted=external_accepted,
        test_refused=test_refused,
    )
    logger.info(
        "OOD score (%s, %d member%s): threshold %.4f accepts %.3f of validation, %.3f of test%s",
        gate.method, len(detector.members), "s" if len(detector.members) > 1 else "", gate.threshold,
        gate.validation_accepted, gate.test_accepted, _external_accepted_text(gate),
    )
    if test_refused:
        logger.info("OOD score refused %d test film%s: %s", len(test_refused), "s" if len(test_refused) > 1 else "",
                    refused_text(test_refused))
    return gate, detector


@contextlib.contextmanager
def _quiet_suite() -> Iterator[None]:
    """The suite's inputs are refused on purpose: keep pydicom's decoder tracebacks (its test files include
    damaged ones) and serving's per-request refusal lines out of the run's log; the summary line says it all."""
    import pydicom  # noqa: F401 - importing it sets its logger's level, so it must come before ours

    loggers = [logging.getLogger(name) for name in ("pydicom", one_path.__name__)]
    levels = [log.level for log in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for log in loggers:
                log.setLevel(logging.CRITICAL)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _score_ood_suite(
    ctx: StageContext, scorer: _Scorer, transformation: DataTransformationArtifact, model: nn.Module,
    best: CandidateEvaluation, point: OperatingPoint | None, gate: OODGate | None, detector: OODDetector | None,
) -> tuple[OODSuiteKind, ...]:
    """The OOD suite through serving's predict path (decode, input checks, OOD score): refusals per kind.

    Built from this run's validation films (inverted and rotated copies) and what installs here (pydicom's CT
    and MR files, matplotlib's images, synthetic images); scored with the run's ``input_gate`` config and no
    operator warn list, so the figure says what the pushed model refuses by default.
    """
    if not ctx.config.evaluation.ood_suite:
        return ()
    from xray.evaluation.ood_suite import build_ood_suite  # imports matplotlib's and pydicom's sample data

    films = transformation.load_array(ctx.run.path, "val_x")
    spec = ModelSpec(
        architecture=best.name, class_names=scorer.classes, preprocessing=scorer.preprocessing, run_id=ctx.run.run_id,
        data_fingerprint="", weights_sha256="", metrics={}, operating_point=point, members=best.members, tta=best.tta,
        temperature=best.calibration.temperature if best.calibration else None, ood=gate, input_gate=ctx.config.input_gate,
    )
    loaded = LoadedModel(spec, model, model, scorer.device, "fp32", f"run {ctx.run.run_id} (evaluation)", detector)
    with _quiet_suite():
        items = build_ood_suite(list(films), max(scorer.preprocessing.image_size, 64), ctx.config.transformation.seed)
        answers = one_path.predict(loaded, [item.data for item in items], one_path.Policy(gate_config=ctx.config.input_gate))
    kinds: dict[str, list[int]] = {}
    for item, result in zip(items, answers):
        counts = kinds.setdefault(item.kind, [0, 0, 0])
        refused = not isinstance(result, one_path.Prediction)  # a refusal, or an upload serving cannot decode (4xx)
        by_score = isinstance(result, one_path.Refusal) and any(r.code == one_path.OOD_REASON for r in result.reasons)
        counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + refused, counts[2] + by_score
    suite = tuple(OODSuiteKind(kind, *counts) for kind, counts in kinds.items())
    total, refused_all = sum(k.count for k in suite), sum(k.refused for k in suite)
    logger.info("OOD suite: %d/%d refused (%s)", refused_all, total, ", ".join(f"{k.kind} {k.refused}/{k.count}" for k in suite))
    return suite


def _clinical_evidence(
    config: PipelineConfig,
    run_dir: RunDir,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    arrays: dict[str, np.ndarray],
    val_probs: np.ndarray,
    test_probs: np.ndarray,
) -> dict:
    """The chosen model's operating point, bootstrap intervals and subgroup metrics (test split)."""
    cfg = config.evaluation
    classes = transformation.class_names
    point = operating_point(cfg.operating_point, classes, (arrays["val_y"], val_probs), (arrays["test_y"], test_probs))
    positive = positive_indices(point.positive, classes) if point else ()
    threshold = point.threshold if point else None
    resamples, seed = cfg.bootstrap_resamples, cfg.bootstrap_seed
    intervals = bootstrap_intervals(arrays["test_y"], test_probs, resamples, seed, positive, threshold)
    subgroups = ()
    if ingestion.metadata_columns:
        metadata = [row.get("metadata") or {} for row in split_rows(run_dir.path, transformation, "test")]
        subgroups = subgroup_metrics(
            arrays["test_y"], test_probs, metadata, classes, resamples, seed, cfg.subgroup_min_count, positive, threshold
        )
    if point:
        logger.info(
            "operating point: P(%s) >= %.4f (validation sensitivity %.3f); test sensitivity %.3f, specificity %.3f",
            "+".join(point.positive), point.threshold, point.validation_sensitivity, point.test_sensitivity, point.test_specificity,
        )
    return {
        "operating_point": point,
        "intervals": intervals,
        "bootstrap": {"resamples": resamples, "seed": seed},
        "subgroups": subgroups,
    }


def choose_best(
    evaluations: list[CandidateEvaluation], metric: str, cv_means: dict[str, float] | None = None
) -> CandidateEvaluation:
    """Highest validation metric, or its cross-validated mean when given (never test).

    Ties go to the better validation loss, then to the earlier candidate.
    """

    def primary(e: CandidateEvaluation) -> float:
        if cv_means is None:
            return e.validation.value(metric)
        value = cv_means[e.name]
        return -math.inf if math.isnan(value) else (-value if metric == "loss" else value)

    return max(evaluations, key=lambda e: (primary(e), -e.validation.loss))


def cross_validation_stats(trainer: ModelTrainerArtifact, metric: str) -> dict[str, dict[str, float]]:
    """Mean, std (ddof=0) and fold count of ``metric`` per candidate; empty unless every candidate was cross-validated."""
    if not trainer.candidates or not all(c.cv_fold_metrics for c in trainer.candidates):
        return {}
    stats = {}
    for c in trainer.candidates:
        values = np.array([getattr(f, metric) for f in c.cv_fold_metrics], dtype=np.float64)
        stats[c.name] = {"mean": float(values.mean()), "std": float(values.std()), "folds": float(len(values))}
    return stats


def _gradcam_gallery(model, arrays, preprocessing, classes, per_class: int, probs: np.ndarray, out: Path) -> Path | None:
    if per_class <= 0:
        return None
    x, y = arrays["test_x"], arrays["test_y"]
    chosen = [i for c in range(len(classes)) for i in np.flatnonzero(y == c)[:per_class]]
    if not chosen:
        return None
    overlays = gradcam_overlays(model, x[chosen], preprocessing)
    images, captions = [], []
    for index, overlay in zip(chosen, overlays):
        images += [x[index], overlay]
        predicted = int(probs[index].argmax())
        captions += [f"true: {classes[y[index]]}", f"pred: {classes[predicted]} ({probs[index, predicted]:.2f})"]
    return plots.gallery_png(images, captions, columns=min(6, 2 * per_class), title="Grad-CAM, test images", path=out / "gradcam.png")


def _comparison(
    evaluations,
    trainer: ModelTrainerArtifact,
    best: str,
    metric: str,
    out: Path,
    cv_stats: dict[str, dict[str, float]] | None = None,
    decision: EnsembleDecision | None = None,
    shortcuts: ShortcutCheck | None = None,
    ood: tuple[OODGate | None, tuple[OODSuiteKind, ...]] = (None, ()),
) -> tuple[Path, Path]:
    """comparison.json and comparison.md: one row per candidate (and the ensemble), the choice and its basis;
    the chosen model's OOD threshold and the OOD suite's refusals per kind."""
    rows = _comparison_rows(evaluations, trainer, best, cv_stats)
    json_path = out / "comparison.json"
    folds = int(next(iter(cv_stats.values()))["folds"]) if cv_stats else 0
    basis = f"{folds}-fold cross-validated {metric} (mean over folds of train+val)" if cv_stats else f"validation {metric}"
    summary = {"selection_metric": basis, "best": best, "candidates": rows}
    if decision is not None:
        summary["ensemble"] = dataclasses.asdict(decision)
    chosen = next(e for e in evaluations if e.name == best)
    summary.update(_generalization_summary(chosen.external, shortcuts))
    gate, suite = ood
    if gate is not None:
        summary["ood"] = {**to_jsonable(gate), "suite": [{**to_jsonable(k), "refusal_rate": k.refusal_rate} for k in suite]}
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"Chosen by {basis}: **{best}**", "", *_comparison_table(rows)]
    if decision is not None:
        lines += ["", f"Ensemble: {decision.reason}."]
    if chosen.external is not None:
        lines += ["", *external_check.external_markdown(chosen.external, best)]
    if shortcuts is not None:
        lines += ["", *shortcut.shortcut_markdown(shortcuts)]
    lines += _ood_lines(best, *ood)
    if cv_stats:
        lines += ["", f"Cross-validation, {metric} per candidate (mean ± std over {folds} folds):", ""]
        lines += [f"- {r['candidate']}: {r['cv_mean']:.4f} ± {r['cv_std']:.4f}" for r in rows if "cv_mean" in r]
        if any(c.cv_final_model == "retrain" for c in trainer.candidates):
            lines += ["", "The final models were retrained on train+val, so their validation numbers above are in-sample."]
        if any(c.cv_final_model == "ensemble" for c in trainer.candidates):
            lines += ["", f"Each final model averages its {folds} fold models, each trained on all but one fold of train+val, "
                      "so its validation numbers above are mostly in-sample; the choice used the cross-validation means."]
    md_path = out / "comparison.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path


def _external_accepted_text(gate: OODGate) -> str:
    return "".join(f", {share:.3f} of external {name}" for name, share in gate.external_accepted.items())


def _ood_lines(best: str, gate: OODGate | None, suite: tuple[OODSuiteKind, ...]) -> list[str]:
    if gate is None:
        return []
    lines = [
        "", f"OOD gate ({best}): {gate.method} score <= {gate.threshold:.4f} is accepted (set on validation to accept "
        f"{gate.acceptance:.0%}); accepted: validation {gate.validation_accepted:.3f}, test {gate.test_accepted:.3f}"
        f"{_external_accepted_text(gate)}.",
    ]
    if suite:
        total, refused = sum(k.count for k in suite), sum(k.refused for k in suite)
        lines += ["", f"OOD suite through the serving predict path: {refused}/{total} refused ({refused / total:.1%}).", "",
                  "| kind | inputs | refused | rate | by the OOD score |", "|---|---|---|---|---|"]
        lines += [f"| {k.kind} | {k.count} | {k.refused} | {k.refusal_rate:.1%} | {k.refused_by_ood_score} |" for k in suite]
    return lines


def _generalization_summary(external: ExternalCheck | None, shortcuts: ShortcutCheck | None) -> dict[str, Any]:
    """comparison.json's external checks (the chosen model's, per source and class, and pooled) and shortcut probes."""
    summary: dict[str, Any] = {}
    if external is not None:
        summary["external"] = to_jsonable(external)
    if shortcuts is not None:
        summary["shortcut"] = to_jsonable(shortcuts)
    return summary


def _external_columns(check: ExternalCheck | None) -> dict[str, Any]:
    """A candidate's comparison columns: pooled external AUC and its worst (source, class) recall."""
    if check is None:
        return {}
    worst = check.worst()
    return {
        "external_roc_auc": check.roc_auc,
        "external_worst_recall": worst[1].recall if worst else None,
        "external_worst": f"{worst[0]} {worst[1].model_class}" if worst else None,
    }


def _comparison_rows(
    evaluations, trainer: ModelTrainerArtifact, best: str, cv_stats: dict[str, dict[str, float]] | None
) -> list[dict[str, Any]]:
    by_name = {c.name: c for c in trainer.candidates}
    rows = []
    for e in evaluations:
        models = [by_name[m] for m in (e.members or (e.name,))]  # a k-fold bag names its candidate K times
        trained = list({c.name: c for c in models}.values())
        rows.append({
            "candidate": e.name,
            "chosen": e.name == best,
            "members": list(e.members),
            "tta": list(e.tta),
            "val_roc_auc": e.validation.roc_auc,
            "val_accuracy": e.validation.accuracy,
            "test_roc_auc": e.test.roc_auc,
            "test_accuracy": e.test.accuracy,
            "test_macro_f1": e.test.macro_f1,
            "test_ece": e.test.ece,
            "test_ece_before_calibration": e.calibration.test_ece_before if e.calibration else None,
            "temperature": e.calibration.temperature if e.calibration else None,
            **_external_columns(e.external),
            "best_epoch": None if e.members else trained[0].best_epoch,
            "epochs_run": sum(len(c.history) for c in trained),
            "train_seconds": round(sum(c.train_seconds for c in trained), 2),
            "images_per_second": None if e.members else trained[0].images_per_second,
            "parameters": sum(c.parameters for c in models),
        })
        if cv_stats and e.name in cv_stats:
            stats = cv_stats[e.name]
            rows[-1].update(cv_mean=stats["mean"], cv_std=stats["std"], cv_folds=int(stats["folds"]))
    return rows


def _comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table; external columns only when the external check ran."""
    with_external = any("external_worst_recall" in r for r in rows)
    header = "| candidate | TTA | val AUC | val acc | test AUC | test acc | test F1 | T | test ECE (before T) |"
    header += " ext AUC | ext worst recall |" if with_external else ""
    header += " epochs | img/s | params |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        mark = " ✔" if r["chosen"] else ""
        name = f"{r['candidate']} ({' + '.join(r['members'])})" if r["members"] else r["candidate"]
        line = (
            f"| {name}{mark} | {', '.join(r['tta']) or '-'} | {r['val_roc_auc']:.4f} | {r['val_accuracy']:.4f} | "
            f"{r['test_roc_auc']:.4f} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | {r['temperature']:.3f} | "
            f"{r['test_ece']:.4f} ({r['test_ece_before_calibration']:.4f}) |"
        )
        if with_external:
            auc, worst = r.get("external_roc_auc"), r.get("external_worst_recall")
            worst_text = "-" if worst is None else f"{worst:.4f} ({r['external_worst']})"
            line += f" {'-' if auc is None else f'{auc:.4f}'} | {worst_text} |"
        img_s = "-" if r["images_per_second"] is None else f"{r['images_per_second']:.0f}"
        line += f" {r['epochs_run']} | {img_s} | {r['parameters']:,} |"
        lines.append(line)
    return lines
