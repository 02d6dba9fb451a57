"""A run as auditors read it: manifest, metrics per candidate, the chosen model, the push decision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xray.store import load_manifest, load_stage_artifact
from xray.typed import to_jsonable


def run_report(root: Path, run_id: str) -> dict[str, Any]:
    manifest = load_manifest(root, run_id)
    evaluation = load_stage_artifact(root, manifest, "model_evaluation")
    pusher = load_stage_artifact(root, manifest, "model_pusher")
    candidates = {}
    if evaluation is not None:
        for c in evaluation.candidates:
            candidates[c.name] = {"validation": to_jsonable(c.validation), "test": to_jsonable(c.test)}
    report = to_jsonable(manifest)
    report.update(
        candidates=candidates,
        chosen_model=evaluation.best_candidate if evaluation else None,
        selection_metric=evaluation.selection_metric if evaluation else None,
        pushed=pusher.pushed if pusher else None,
        model_tag=pusher.model_tag if pusher else None,
        push_reasons=list(pusher.reasons) if pusher else [],
    )
    return report
