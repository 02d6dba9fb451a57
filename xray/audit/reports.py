"""A run as auditors read it: manifest, metrics per candidate, the chosen model, the push decision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xray.entity.run_summary import RunSummary
from xray.pipeline.store import RunManifest, load_manifest, load_stage_artifact
from xray.typed import to_jsonable


def run_summary(root: Path, run_id: str, manifest: RunManifest | None = None) -> RunSummary:
    """The run's summary built from its run directory (its evaluation and pusher artifacts)."""
    manifest = manifest or load_manifest(root, run_id)
    return RunSummary.of(
        load_stage_artifact(root, manifest, "model_evaluation"), load_stage_artifact(root, manifest, "model_pusher")
    )


def run_report(root: Path, run_id: str) -> dict[str, Any]:
    manifest = load_manifest(root, run_id)
    evaluation = load_stage_artifact(root, manifest, "model_evaluation")
    summary = run_summary(root, run_id, manifest)
    report = to_jsonable(manifest)
    report.update(
        candidates={c.name: {"validation": to_jsonable(c.validation), "test": to_jsonable(c.test)} for c in (evaluation.candidates if evaluation else ())},
        chosen_model=summary.best_candidate,
        selection_metric=summary.selection_metric,
        pushed=summary.pushed,
        model_tag=summary.model_tag,
        push_reasons=list(summary.push_reasons),
    )
    return report
