"""What a finished run came to, as one typed record: the CLI, the reports, the API and the pages read this.

Why: the same few facts (the chosen candidate, each candidate's headline
scores, the push decision) were projected from the artifacts in three places.
It is produced once, from the run's evaluation and pusher artifacts, and
stored in the manifest as ``summary`` (the same JSON keys as always).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xray.entity.artifact_entity import ModelEvaluationArtifact, ModelPusherArtifact, SplitMetrics
from xray.typed import from_mapping

HEADLINE = ("accuracy", "roc_auc")  # the scores a summary keeps per split


@dataclass(frozen=True)
class CandidateScores:
    validation: dict[str, float]  # accuracy, roc_auc
    test: dict[str, float]


@dataclass(frozen=True)
class RunSummary:
    best_candidate: str | None = None
    selection_metric: str | None = None
    selection_basis: str | None = None
    candidates: dict[str, CandidateScores] = field(default_factory=dict)
    pushed: bool | None = None  # None: no push stage ran
    model_tag: str | None = None
    push_reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, evaluation: ModelEvaluationArtifact | None, pusher: ModelPusherArtifact | None) -> RunSummary:
        """From the run's artifacts; either may be missing (a run that stopped early, a disabled push)."""
        return cls(
            best_candidate=evaluation.best_candidate if evaluation else None,
            selection_metric=evaluation.selection_metric if evaluation else None,
            selection_basis=evaluation.selection_basis if evaluation else None,
            candidates={
                c.name: CandidateScores(validation=_headline(c.validation), test=_headline(c.test))
                for c in (evaluation.candidates if evaluation else ())
            },
            pushed=None if pusher is None else pusher.pushed,
            model_tag=None if pusher is None else pusher.model_tag,
            push_reasons=() if pusher is None else tuple(pusher.reasons),
        )

    @classmethod
    def read(cls, stored: Mapping[str, Any] | None) -> RunSummary:
        """From a manifest's ``summary`` (empty until the run succeeded)."""
        return from_mapping(cls, dict(stored or {}))

    def best_scores(self) -> CandidateScores | None:
        return self.candidates.get(self.best_candidate or "")


def _headline(metrics: SplitMetrics) -> dict[str, float]:
    return {name: getattr(metrics, name) for name in HEADLINE}
