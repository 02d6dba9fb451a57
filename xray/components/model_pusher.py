"""Stage 5: the gate and the push.

The best candidate goes into BentoML's model store only if it clears the
configured thresholds on the test split and is at least as good as the
current production model re-scored on this same test split. Either way the
decision and its reasons are an artifact, so an auditor sees why.

A push is all or nothing: the evidence is sealed first (its digest goes
into the model's metadata), then the S3 copy is made when ``push.s3_uri``
is set, and only then does the model enter the store, where BentoML writes
it to a temporary folder and moves ``latest`` once it is complete. Any
failure before that leaves the store and ``latest`` as they were.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from xray.audit import registry
from xray.entity.artifact_entity import (
    DataIngestionArtifact,
    DataTransformationArtifact,
    ModelEvaluationArtifact,
    ModelPusherArtifact,
    RuntimeExport,
    SplitMetrics,
)
from xray.entity.config_entity import GateConfig, InputGateConfig, PipelineConfig
from xray.errors import XrayError
from xray.evaluation.metrics import compute_metrics
from xray.models.ood import OOD_FILE
from xray.models.builders import load_checkpoint
from xray.serving.serving_model import (
    ModelSpec, build_for_spec, load_stored_model, production_model_dir, write_model_dir,
)
from xray.audit.seal import seal_evidence
from xray.data.preprocessing import preprocessing_of
from xray.data.snapshot import split_pixels
from xray.pipeline.stage import Inputs, StageContext
from xray.pipeline.store import RunDir, fingerprint as fingerprint_of, new_header, sha256_file, stage_code_hash, utc_now, write_json_atomic
from xray.typed import to_jsonable

logger = logging.getLogger(__name__)

STAGE = "model_pusher"
CACHED = False  # the gate compares with the production model, which lives outside the run


def fingerprint(config: PipelineConfig, inputs: Inputs) -> str:
    """The gate and push settings, the evaluated model and its data, and this code.

    Never a cache key: the gate compares with the production model, which lives outside the run.
    """
    upstream = [
        inputs.get(DataIngestionArtifact).header.fingerprint,
        inputs.get(DataTransformationArtifact).header.fingerprint,
        inputs.get(ModelEvaluationArtifact).header.fingerprint,
    ]
    params = {"gate": to_jsonable(config.gate), "push": to_jsonable(config.push)}
    return fingerprint_of(STAGE, params, upstream, stage_code_hash(__name__))


def run(ctx: StageContext, inputs: Inputs) -> ModelPusherArtifact:
    config, run_dir = ctx.config, ctx.run
    ingestion, transformation = inputs.get(DataIngestionArtifact), inputs.get(DataTransformationArtifact)
    evaluation = inputs.get(ModelEvaluationArtifact)
    best, metric = evaluation.chosen(), evaluation.selection_metric
    reasons = _gate_reasons(best.test, config.gate) + _ood_reasons(evaluation, config.gate) + generalization_reasons(evaluation, config.gate)
    candidate_score = best.test.value(metric)
    production_tag, production_score = None, None
    if config.gate.compare_with_production:
        production_tag, production_score = _rescore_production(run_dir, ingestion, transformation, config.push.model_name, metric)
    if production_score is not None and candidate_score < production_score:
        reasons.append(
            f"test {metric} {candidate_score:.4f} is below production {production_tag} "
            f"re-scored on this test split ({production_score:.4f})"
        )
    model_tag, s3_uris, evidence = None, [], None
    if not reasons:
        previous = registry.production_tag(config.push.model_name)
        model_tag, s3_uris, evidence = push_model(config, run_dir, ingestion, transformation, evaluation)
        reasons = [f"passed the gate; pushed as {model_tag} (evidence seal {evidence})"]
        if production_score is not None:
            reasons.append(f"test {metric} {candidate_score:.4f} >= production {production_tag} ({production_score:.4f})")
        reasons += ungated_notes(evaluation)
        registry.record_change(
            config.push.model_name, "gate", previous, model_tag,
            f"run {run_dir.run_id}: test {metric} {candidate_score:.4f}; " + "; ".join(reasons),
            who=f"gate ({registry.current_user()})",
        )
        logger.info("model_pusher: %s", "; ".join(reasons))
    else:
        reasons += ungated_notes(evaluation)
        logger.warning("model_pusher: %s not pushed: %s", best.name, "; ".join(reasons))
    decision_path = run_dir.stage_dir(STAGE) / "decision.json"
    artifact_fields = dict(
        pushed=model_tag is not None, candidate=best.name, reasons=tuple(reasons), model_tag=model_tag,
        production_before=production_tag, production_score=production_score, candidate_score=candidate_score,
        s3_uris=tuple(s3_uris), evidence_seal=evidence,
    )
    write_json_atomic(decision_path, {"gate": to_jsonable(config.gate), "metric": metric, **artifact_fields})
    return ModelPusherArtifact(
        header=new_header(
            run_dir, ModelPusherArtifact, STAGE, ctx.fingerprint,
            parents=[evaluation.header.artifact_id, transformation.header.artifact_id], files=[decision_path],
        ),
        **artifact_fields,
    )


def _gate_reasons(test: SplitMetrics, gate: GateConfig) -> list[str]:
    """Why the chosen model may not be pushed on its own test numbers (empty: it clears the thresholds)."""
    reasons: list[str] = []
    if not test.roc_auc >= gate.min_roc_auc:
        reasons.append(f"test ROC-AUC {test.roc_auc:.4f} is below gate.min_roc_auc {gate.min_roc_auc}")
    if test.accuracy < gate.min_accuracy:
        reasons.append(f"test accuracy {test.accuracy:.4f} is below gate.min_accuracy {gate.min_accuracy}")
    for name, per_class in test.per_class.items():
        if per_class.recall < gate.min_class_recall:
            reasons.append(f"recall of {name} {per_class.recall:.4f} is below gate.min_class_recall {gate.min_class_recall}")
    return reasons


def _ood_reasons(evaluation: ModelEvaluationArtifact, gate: GateConfig) -> list[str]:
    """gate.min_ood_refusal: the OOD suite's refusal rate (all kinds together) must reach it; 0 is off."""
    if gate.min_ood_refusal <= 0:
        return []
    suite = evaluation.ood_suite
    if not suite:
        return [f"gate.min_ood_refusal {gate.min_ood_refusal} is set but the OOD suite was not scored (evaluation.ood_suite)"]
    total, refused = sum(k.count for k in suite), sum(k.refused for k in suite)
    if refused / total < gate.min_ood_refusal:
        worst = min(suite, key=lambda k: k.refusal_rate)
        return [
            f"OOD suite refusal rate {refused / total:.4f} ({refused}/{total}) is below gate.min_ood_refusal "
            f"{gate.min_ood_refusal} (lowest kind: {worst.kind} {worst.refusal_rate:.4f})"
        ]
    return []


def generalization_reasons(evaluation: ModelEvaluationArtifact, gate: GateConfig) -> list[str]:
    """Refusals from the external checks (per source and class) and the shortcut probes, each naming its figure."""
    reasons: list[str] = []
    external = evaluation.external_check()
    for source in external.sources if external is not None else ():
        for result in source.per_class:
            floor = _recall_floor(gate, result.model_class)
            if floor is not None and result.recall is not None and result.recall < floor:
                called = result.misses_text()
                reasons.append(
                    f"external recall of {result.model_class} on {source.name} {result.recall:.4f} "
                    f"({result.correct} of {result.films}; misses called {called}) is below {_recall_key(gate, result.model_class)} {floor}"
                )
    shortcut = evaluation.shortcut
    for probe in shortcut.probes if shortcut is not None else ():
        if probe.score > gate.max_shortcut_score:
            reasons.append(
                f"shortcut score of the {probe.name} probe {probe.score:.4f} is above gate.max_shortcut_score {gate.max_shortcut_score}"
            )
    return reasons


def ungated_notes(evaluation: ModelEvaluationArtifact) -> list[str]:
    """What the external gate could not look at: classes with no external films are not gated, and the decision says so."""
    external = evaluation.external_check()
    if external is None or not external.no_external_films:
        return []
    return [f"note: no external films of {', '.join(external.no_external_films)}, so not gated on external recall"]


def _recall_floor(gate: GateConfig, name: str) -> float | None:
    """gate.min_external_recall for a class: the one number, the map's entry, or None (a map without the class)."""
    floor = gate.min_external_recall
    return floor.get(name) if isinstance(floor, dict) else floor


def _recall_key(gate: GateConfig, name: str) -> str:
    return f"gate.min_external_recall.{name}" if isinstance(gate.min_external_recall, dict) else "gate.min_external_recall"


def _rescore_production(
    run_dir: RunDir, ingestion: DataIngestionArtifact, transformation: DataTransformationArtifact, model_name: str, metric: str
) -> tuple[str | None, float | None]:
    """(production tag, its ``metric`` on this run's test split); (None, None) when there is none or its classes differ."""
    production = production_model_dir(model_name)
    if production is None:
        return None, None
    production_tag, _ = production
    prod = load_stored_model(production_tag)
    if tuple(prod.spec.class_names) != tuple(transformation.class_names):
        logger.info("production %s has other classes %s; not comparable", production_tag, prod.spec.class_names)
        return None, None
    pixels, labels = split_pixels(run_dir.path, ingestion, transformation, "test", prod.spec.preprocessing.image_size)
    prod_metrics = compute_metrics(labels, prod.calibrated_proba(pixels), transformation.class_names)
    return production_tag, prod_metrics.value(metric)


def model_spec(
    run_id: str,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    evaluation: ModelEvaluationArtifact,
    checkpoint: Path,
    seal_digest: str | None = None,
    input_gate: InputGateConfig | None = None,
) -> ModelSpec:
    """The chosen model's spec: what the pusher stores and what an MLflow export logs."""
    best = evaluation.chosen()
    return ModelSpec(
        architecture=best.name,
        class_names=transformation.class_names,
        preprocessing=preprocessing_of(transformation, evaluation.image_size),
        run_id=run_id,
        data_fingerprint=ingestion.data_fingerprint,
        weights_sha256=sha256_file(checkpoint),
        metrics={"validation": to_jsonable(best.validation), "test": to_jsonable(best.test)},
        operating_point=evaluation.operating_point,
        members=best.members,
        tta=best.tta,
        seal_digest=seal_digest,
        temperature=best.calibration.temperature if best.calibration else None,
        # the refused test films' names stay in the run's evidence: /metadata serves model.json's gate to any caller
        ood=dataclasses.replace(evaluation.ood, file=OOD_FILE, test_refused=()) if evaluation.ood else None,
        input_gate=input_gate,
    )


def push_model(
    config: PipelineConfig,
    run_dir: RunDir,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    evaluation: ModelEvaluationArtifact,
) -> tuple[str, list[str], str]:
    """Seal the evidence, copy to S3, then enter the store: (model tag, S3 URIs, evidence seal digest).

    The store comes last, so a model is in it (and ``latest``) only when everything else worked.
    """
    import bentoml

    run_dir.stage_dir(STAGE)
    export = export_model(config, run_dir, ingestion, transformation, evaluation)  # before the seal: it is evidence
    evidence = seal_evidence(run_dir.root, run_dir.run_id, utc_now())
    tag = str(bentoml.Tag(config.push.model_name).make_new_version())
    s3_uris = _upload_to_s3(config, run_dir, evaluation, tag, evidence)
    _add_to_store(config, run_dir, ingestion, transformation, evaluation, tag, evidence, export)
    return tag, s3_uris, evidence


EXPORT_DIR = "export"  # the ONNX graphs and export.json, in the pusher's stage folder


def export_model(
    config: PipelineConfig,
    run_dir: RunDir,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    evaluation: ModelEvaluationArtifact,
) -> RuntimeExport | None:
    """The chosen model's ONNX graphs (``xray.serving.runtime``), checked on validation; None: not exported.

    A failed export or check never stops the push: the model is then served on eager PyTorch, and the run
    log and ``export.json`` say why.
    """
    if config.push.export == "none":
        return None
    from xray.serving.runtime import make_export

    out = run_dir.stage_dir(STAGE) / EXPORT_DIR
    out.mkdir(exist_ok=True)
    spec = model_spec(run_dir.run_id, ingestion, transformation, evaluation, run_dir.path / evaluation.best_checkpoint)
    size = spec.preprocessing.image_size
    try:
        model = load_checkpoint(build_for_spec(spec), run_dir.path / evaluation.best_checkpoint)
        validation, _ = split_pixels(run_dir.path, ingestion, transformation, "val", size)
        calibration, _ = split_pixels(run_dir.path, ingestion, transformation, "train", size)
        export = make_export(model, spec.preprocessing, spec.tta, validation, calibration, out, config.push.int8)
    except Exception as exc:  # noqa: BLE001 - an exporter failure is reported, and PyTorch serves
        logger.warning("model_pusher: ONNX export failed, serving on eager PyTorch: %s: %s", type(exc).__name__, exc)
        write_json_atomic(out / "export.json", {"exported": False, "error": f"{type(exc).__name__}: {exc}"})
        return None
    write_json_atomic(out / "export.json", {"exported": True, **to_jsonable(export)})
    return export


def _add_to_store(
    config: PipelineConfig,
    run_dir: RunDir,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    evaluation: ModelEvaluationArtifact,
    tag: str,
    evidence: str,
    export: RuntimeExport | None = None,
) -> None:
    import bentoml

    best = evaluation.chosen()
    checkpoint = run_dir.path / evaluation.best_checkpoint
    spec = model_spec(run_dir.run_id, ingestion, transformation, evaluation, checkpoint, evidence, config.input_gate)
    spec = dataclasses.replace(spec, export=export)
    metrics = spec.metrics
    summary_metrics = {f"{split}_{k}": metrics[split][k] for split in ("validation", "test") for k in ("accuracy", "roc_auc")}
    labels = {"stage": "production", "architecture": best.name, "run_id": run_dir.run_id}
    if best.members:
        labels["members"] = "+".join(best.members)
    metadata = {
        "class_names": list(spec.class_names),
        "architecture": spec.architecture,
        "image_size": spec.preprocessing.image_size,
        "normalization": {"mean": spec.preprocessing.mean, "std": spec.preprocessing.std},
        "grayscale": True,
        "members": list(spec.members),
        "tta": list(spec.tta),
        "run_id": run_dir.run_id,
        "seal_digest": evidence,
        "data_uri": ingestion.source_uri,
        "data_fingerprint": ingestion.data_fingerprint,
        "weights_sha256": spec.weights_sha256,
        "gate_passed": True,  # what `xray models promote` checks: only gated models may become production
        "gate_metric": evaluation.selection_metric,
        **summary_metrics,
    }
    if spec.operating_point is not None:
        metadata["operating_point"] = to_jsonable(spec.operating_point)
    if spec.temperature is not None:
        metadata["temperature"] = spec.temperature
    if spec.ood is not None:  # serving checks the statistics file against this, as it checks the weights
        metadata.update(ood_stats_sha256=spec.ood.sha256, ood_threshold=spec.ood.threshold)
    if export is not None:
        metadata["onnx_graphs"] = {
            g.file: {"sha256": g.sha256, "serves_in": [c.runtime for c in export.graphs if c.file == g.file and c.passed]}
            for g in export.graphs
        }
    try:
        # BentoML builds the model in a temporary folder and registers it in the store on a clean exit.
        with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
            card = run_dir.path / evaluation.model_card_json if evaluation.model_card_json else None
            stats = run_dir.path / evaluation.ood.file if evaluation.ood else None
            write_model_dir(Path(model.path), spec, checkpoint, card, stats, run_dir.stage_dir(STAGE) / EXPORT_DIR)
    except Exception as exc:  # noqa: BLE001 - a store failure is the push failing, reported as such
        raise XrayError(f"push to BentoML model store failed: {exc}") from exc


def _upload_to_s3(
    config: PipelineConfig, run_dir: RunDir, evaluation: ModelEvaluationArtifact, model_tag: str, evidence: str
) -> list[str]:
    if not config.push.s3_uri:
        return []
    from xray.data.sources.s3 import S3Settings, upload_file

    settings = S3Settings.from_config(config.ingestion.s3)
    base = config.push.s3_uri.rstrip("/") + f"/{model_tag.replace(':', '/')}"
    report = run_dir.stage_dir(STAGE) / "report.json"
    report.write_text(json.dumps({"run_id": run_dir.run_id, "model_tag": model_tag, "seal_digest": evidence}, indent=2))
    try:
        uris = [upload_file(run_dir.path / evaluation.best_checkpoint, f"{base}/weights.pt", settings)]
        uris.append(upload_file(run_dir.path / evaluation.comparison_json, f"{base}/comparison.json", settings))
        if evaluation.model_card_json:
            uris.append(upload_file(run_dir.path / evaluation.model_card_json, f"{base}/model_card.json", settings))
        uris.append(upload_file(report, f"{base}/report.json", settings))
    except XrayError as exc:
        raise XrayError(f"push failed, model not added to the store: S3 copy to {base} failed: {exc}") from exc
    return uris
