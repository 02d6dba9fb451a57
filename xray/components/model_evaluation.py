"""Stage 4: score every candidate on validation and test, draw the report, pick the best.

The choice uses validation only (``evaluation.selection_metric``), so the
test numbers stay an honest estimate of what the chosen model will do.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from xray import model_card, plots
from xray.bootstrap import bootstrap_intervals, subgroup_metrics
from xray.components.model_trainer import preprocessing_of
from xray.entity.artifact_entity import (
    CandidateEvaluation,
    DataIngestionArtifact,
    DataTransformationArtifact,
    ModelEvaluationArtifact,
    ModelTrainerArtifact,
    SplitMetrics,
)
from xray.entity.config_entity import PipelineConfig
from xray.explain import gradcam_overlays
from xray.inference import choose_device, prepare_model, predict_proba
from xray.metrics import compute_metrics
from xray.models import build_model, load_checkpoint
from xray.operating_point import operating_point, positive_indices
from xray.preprocessing import resize_batch
from xray.store import RunDir, fingerprint, new_header
from xray.typed import to_jsonable

logger = logging.getLogger(__name__)

STAGE = "model_evaluation"


def stage_fingerprint(
    config: PipelineConfig, transformation: DataTransformationArtifact, trainer: ModelTrainerArtifact, code: str
) -> str:
    upstream = [transformation.header.fingerprint, trainer.header.fingerprint]
    return fingerprint(STAGE, to_jsonable(config.evaluation), upstream, code)


def run(
    config: PipelineConfig,
    run_dir: RunDir,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    trainer: ModelTrainerArtifact,
    code: str,
) -> ModelEvaluationArtifact:
    cfg = config.evaluation
    out = run_dir.stage_dir(STAGE)
    classes = transformation.class_names
    preprocessing = preprocessing_of(transformation, trainer.architecture_input["image_size"])
    arrays = {k: np.load(run_dir.path / v) for k, v in transformation.arrays.items() if not k.startswith("train")}
    arrays = {k: resize_batch(v, preprocessing.image_size) if k.endswith("_x") else v for k, v in arrays.items()}
    device = choose_device()

    evaluations, test_probs, val_probs, models, files = [], {}, {}, {}, []
    for candidate in trainer.candidates:
        model = load_checkpoint(build_model(candidate.name, len(classes)), run_dir.path / candidate.checkpoint)
        model = prepare_model(model, device)
        scores = {}
        for split in ("val", "test"):
            probs = predict_proba(model, arrays[f"{split}_x"], preprocessing, device)
            scores[split] = compute_metrics(arrays[f"{split}_y"], probs, classes, cfg.calibration_bins)
            (test_probs if split == "test" else val_probs)[candidate.name] = probs
        cm_path = plots.confusion_matrix_png(
            np.array(scores["test"].confusion_matrix), classes, f"{candidate.name}: test", out / f"confusion_{candidate.name}.png"
        )
        files.append(cm_path)
        evaluations.append(
            CandidateEvaluation(
                name=candidate.name, validation=scores["val"], test=scores["test"],
                plots={"confusion_matrix": run_dir.relative(cm_path)},
            )
        )
        models[candidate.name] = model
        logger.info(
            "%s: val auc %.4f acc %.4f | test auc %.4f acc %.4f",
            candidate.name, scores["val"].roc_auc, scores["val"].accuracy, scores["test"].roc_auc, scores["test"].accuracy,
        )

    cv_stats = cross_validation_stats(trainer, cfg.selection_metric)
    cv_means = {name: stats["mean"] for name, stats in cv_stats.items()} or None
    basis = "cross_validation" if cv_means else "validation"
    best = choose_best(evaluations, cfg.selection_metric, cv_means)
    best_candidate = next(c for c in trainer.candidates if c.name == best.name)
    report_plots = {
        "roc_curves": plots.roc_curves_png(arrays["test_y"], test_probs, classes, "ROC, test split", out / "roc_curves.png"),
        "training_curves": plots.training_curves_png({c.name: c.history for c in trainer.candidates}, out / "training_curves.png"),
        "confusion_matrix": out / f"confusion_{best.name}.png",
    }
    gradcam = _gradcam_gallery(models[best.name], arrays, preprocessing, classes, cfg.gradcam_per_class, test_probs[best.name], out)
    if gradcam is not None:
        report_plots["gradcam"] = gradcam
    if cv_stats:
        fold_values = {c.name: tuple(getattr(f, cfg.selection_metric) for f in c.cv_fold_metrics) for c in trainer.candidates}
        report_plots["cv_folds"] = plots.folds_png(fold_values, cfg.selection_metric, out / "cv_folds.png")
    clinical = _clinical_evidence(config, run_dir, ingestion, transformation, arrays, val_probs[best.name], test_probs[best.name])
    card = model_card.build_card(
        run_dir.run_id, best.name, ingestion, transformation, clinical["intervals"], clinical["bootstrap"],
        clinical["operating_point"], clinical["subgroups"], f"{basis.replace('_', '-')} {cfg.selection_metric}",
    )
    card_json, card_md = model_card.write_card(card, out)
    files += [card_json, card_md]
    table_md, table_json = _comparison(evaluations, trainer, best.name, cfg.selection_metric, out, cv_stats)
    files += [p for k, p in report_plots.items() if k != "confusion_matrix"] + [table_md, table_json]
    logger.info("best candidate by %s %s: %s", basis.replace("_", "-"), cfg.selection_metric, best.name)
    return ModelEvaluationArtifact(
        header=new_header(
            run_dir, ModelEvaluationArtifact, STAGE, stage_fingerprint(config, transformation, trainer, code),
            parents=[transformation.header.artifact_id, trainer.header.artifact_id], files=files,
        ),
        selection_metric=cfg.selection_metric,
        best_candidate=best.name,
        best_checkpoint=best_candidate.checkpoint,
        candidates=tuple(evaluations),
        comparison_markdown=run_dir.relative(table_md),
        comparison_json=run_dir.relative(table_json),
        plots={k: run_dir.relative(p) for k, p in report_plots.items()},
        gradcam=(run_dir.relative(gradcam),) if gradcam is not None else (),
        selection_basis=basis,
        cross_validation=cv_stats,
        **clinical,
        model_card_json=run_dir.relative(card_json),
        model_card_markdown=run_dir.relative(card_md),
        image_size=preprocessing.image_size,
    )


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
        index = run_dir.path / Path(transformation.arrays["test_x"]).parent / "splits.jsonl"
        with open(index) as fh:
            rows = [row for row in map(json.loads, fh) if row["split"] == "test"]
        metadata = [row.get("metadata") or {} for row in sorted(rows, key=lambda r: r["row"])]
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


def metric_value(metrics: SplitMetrics, metric: str) -> float:
    value = getattr(metrics, metric)
    return -math.inf if value is None or math.isnan(value) else float(value)


def choose_best(
    evaluations: list[CandidateEvaluation], metric: str, cv_means: dict[str, float] | None = None
) -> CandidateEvaluation:
    """Highest validation metric, or its cross-validated mean when given (never test).

    Ties go to the better validation loss, then to the earlier candidate.
    """

    def primary(e: CandidateEvaluation) -> float:
        if cv_means is None:
            return metric_value(e.validation, metric)
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
) -> tuple[Path, Path]:
    by_name = {c.name: c for c in trainer.candidates}
    rows = []
    for e in evaluations:
        c = by_name[e.name]
        rows.append({
            "candidate": e.name,
            "chosen": e.name == best,
            "val_roc_auc": e.validation.roc_auc,
            "val_accuracy": e.validation.accuracy,
            "test_roc_auc": e.test.roc_auc,
            "test_accuracy": e.test.accuracy,
            "test_macro_f1": e.test.macro_f1,
            "test_ece": e.test.ece,
            "best_epoch": c.best_epoch,
            "epochs_run": len(c.history),
            "train_seconds": c.train_seconds,
            "images_per_second": c.images_per_second,
            "parameters": c.parameters,
        })
        if cv_stats:
            stats = cv_stats[e.name]
            rows[-1].update(cv_mean=stats["mean"], cv_std=stats["std"], cv_folds=int(stats["folds"]))
    json_path = out / "comparison.json"
    folds = int(next(iter(cv_stats.values()))["folds"]) if cv_stats else 0
    basis = f"{folds}-fold cross-validated {metric} (mean over folds of train+val)" if cv_stats else f"validation {metric}"
    json_path.write_text(json.dumps({"selection_metric": basis, "best": best, "candidates": rows}, indent=2) + "\n")
    header = "| candidate | val AUC | val acc | test AUC | test acc | test F1 | test ECE | epochs | img/s | params |"
    lines = [f"Chosen by {basis}: **{best}**", "", header, "|" + "---|" * 10]
    for r in rows:
        mark = " ✔" if r["chosen"] else ""
        lines.append(
            f"| {r['candidate']}{mark} | {r['val_roc_auc']:.4f} | {r['val_accuracy']:.4f} | {r['test_roc_auc']:.4f} | "
            f"{r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | {r['test_ece']:.4f} | {r['epochs_run']} | "
            f"{r['images_per_second']:.0f} | {r['parameters']:,} |"
        )
    if cv_stats:
        lines += ["", f"Cross-validation, {metric} per candidate (mean ± std over {folds} folds):", ""]
        lines += [f"- {r['candidate']}: {r['cv_mean']:.4f} ± {r['cv_std']:.4f}" for r in rows]
        if any(c.cv_final_model == "retrain" for c in trainer.candidates):
            lines += ["", "The final models were retrained on train+val, so their validation numbers above are in-sample."]
    md_path = out / "comparison.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path
