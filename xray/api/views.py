"""A run as the API and the pages show it: the manifest plus what its stage artifacts say.

Reading never fails because one artifact is damaged: what cannot be read is
listed in ``problems`` and the rest is still shown (an auditor needs the
page most when something is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from xray.api.schemas import CandidateScores, Progress, PushDecision, RunDetail, RunSummary, StageInfo
from xray.entity.artifact_entity import ModelEvaluationArtifact
from xray.entity.run_summary import RunSummary as StoredSummary
from xray.errors import RunError
from xray.pipeline.store import STAGES, RunManifest, load_stage_artifact
from xray.typed import to_jsonable


def artifact_url(run_id: str, path: str) -> str:
    return f"/runs/{quote(run_id)}/artifacts/{quote(path)}"


def summary(manifest: RunManifest) -> RunSummary:
    s = StoredSummary.read(manifest.summary)
    scores = s.best_scores()
    return RunSummary(
        run_id=manifest.run_id,
        status=manifest.status,
        reason=manifest.reason,
        created_at=manifest.created_at,
        finished_at=manifest.finished_at,
        data_uri=manifest.data_uri,
        current_stage=manifest.current_stage,
        progress=Progress(**(manifest.progress or {})),
        best_candidate=s.best_candidate,
        val_roc_auc=scores.validation.get("roc_auc") if scores else None,
        test_accuracy=scores.test.get("accuracy") if scores else None,
        pushed=s.pushed,
        model_tag=s.model_tag,
    )


@dataclass(frozen=True)
class Lineage:
    """One stage's artifact as an auditor reads it."""

    stage: str
    artifact_id: str
    artifact_type: str
    producer_run: str
    created_at: str
    fingerprint: str
    parents: tuple[str, ...]
    files: tuple[dict[str, Any], ...]  # path, sha256, size, url
    cached_from: str | None


@dataclass(frozen=True)
class ExternalRow:
    """One line of the run page's external table: a class on one source, or pooled over every source."""

    source: str  # the source's name, or "all sources"
    model_class: str
    films: int
    recall: float | None
    misses: str  # "Covid 149, Viral Pneumonia 1"
    roc_auc: float | None
    pooled: bool = False
    interval: str = "-"  # the recall's 95 % Wilson interval, "[0.626, 0.857]"


@dataclass(frozen=True)
class RunView:
    detail: RunDetail
    artifacts: dict[str, Any] = field(default_factory=dict)  # stage -> typed artifact
    lineage: tuple[Lineage, ...] = ()
    external: tuple[ExternalRow, ...] = ()  # the chosen model's external checks, per source and class, then pooled


def external_rows(evaluation: ModelEvaluationArtifact | None) -> tuple[ExternalRow, ...]:
    """The chosen model's external checks as table rows (empty when none were configured)."""
    check = evaluation.external_check() if evaluation is not None else None
    if check is None:
        return ()
    rows = [(s.name, r, False) for s in check.sources for r in s.per_class] + [("all sources", r, True) for r in check.pooled]
    return tuple(
        ExternalRow(
            source=name, model_class=r.model_class, films=r.films, recall=r.recall, roc_auc=r.roc_auc, pooled=pooled,
            interval=r.interval_text(),
            misses=r.misses_text() or "–",
        )
        for name, r, pooled in rows
    )


def load_view(root: Path, manifest: RunManifest) -> RunView:
    artifacts: dict[str, Any] = {}
    problems: list[str] = []
    for stage in STAGES:
        try:
            artifact = load_stage_artifact(root, manifest, stage)
        except RunError as exc:
            problems.append(f"{stage}: {exc}")
            continue
        if artifact is not None:
            artifacts[stage] = artifact
    run_id = manifest.run_id
    evaluation = artifacts.get("model_evaluation")
    pusher = artifacts.get("model_pusher")
    # the artifacts when readable, else what the manifest recorded when the run ended
    run_summary = StoredSummary.of(evaluation, pusher) if evaluation is not None else StoredSummary.read(manifest.summary)
    candidates = {k: CandidateScores(validation=v.validation, test=v.test) for k, v in run_summary.candidates.items()}
    plots: dict[str, str] = {}
    gradcam: list[str] = []
    if evaluation is not None:
        plots = {name: artifact_url(run_id, path) for name, path in evaluation.plots.items()}
        gradcam = [artifact_url(run_id, path) for path in evaluation.gradcam]
    push = None
    if pusher is not None:
        push = PushDecision(**{k: v for k, v in to_jsonable(pusher).items() if k in PushDecision.model_fields})
    base = summary(manifest)
    detail = RunDetail(
        **base.model_dump(),
        stages={name: StageInfo(**to_jsonable(rec)) for name, rec in manifest.stages.items()},
        candidates=candidates,
        selection_metric=run_summary.selection_metric,
        push=push,
        config=manifest.config,
        code=manifest.code,
        pid=manifest.pid,
        host=manifest.host,
        plots=plots,
        gradcam=gradcam,
        problems=problems,
    )
    return RunView(detail=detail, artifacts=artifacts, lineage=_lineage(manifest, artifacts), external=external_rows(evaluation))


def _lineage(manifest: RunManifest, artifacts: dict[str, Any]) -> tuple[Lineage, ...]:
    run_id = manifest.run_id
    return tuple(
        Lineage(
            stage=stage,
            artifact_id=a.header.artifact_id,
            artifact_type=a.header.artifact_type,
            producer_run=a.header.run_id,
            created_at=a.header.created_at,
            fingerprint=a.header.fingerprint,
            parents=tuple(a.header.parents),
            files=tuple(
                {"path": f.path, "sha256": f.sha256, "size": f.size, "url": artifact_url(run_id, f.path)}
                for f in a.header.files
            ),
            cached_from=manifest.stages[stage].cached_from if stage in manifest.stages else None,
        )
        for stage, a in artifacts.items()
    )
