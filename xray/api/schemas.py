"""Request and response models: what /docs shows is what the endpoints take and return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from xray.api.policy import TRAIN_OVERRIDES
from xray.data.sources import registry


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        None,
        max_length=4096,
        description=f"dataset URI: {registry.served()} (default: the config's data_uri); elsewhere: 403",
        examples=["demo"],
    )
    overrides: list[str] = Field(
        default_factory=list,
        max_length=200,
        description="config overrides, each section.key=value (value parsed as YAML); a train token may set only "
        f"{', '.join(TRAIN_OVERRIDES)} (others: 403, admin tokens only)",
        examples=[["trainer.epochs=5", "trainer.candidates=[simple_cnn]"]],
    )


class TrainAccepted(BaseModel):
    run_id: str
    status: str = Field(description="queued: the worker has been started")
    url: str = Field(description="where to follow the run")


class ErrorOut(BaseModel):
    detail: str


class ConflictOut(BaseModel):
    detail: str
    run_id: str = Field(description="the run that is queued or running")


class SplitScores(BaseModel):
    accuracy: float
    roc_auc: float


class CandidateScores(BaseModel):
    validation: SplitScores
    test: SplitScores


class StageInfo(BaseModel):
    status: str = Field(description="running | succeeded | failed")
    started_at: str
    finished_at: str | None = None
    seconds: float | None = None
    artifact_id: str | None = None
    artifact: str | None = Field(None, description="run-relative path of the stage's artifact.json")
    artifact_sha256: str | None = None
    cached_from: str | None = Field(None, description="the run this stage's result was reused from")


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    candidate: str | None = None
    epoch: int | None = None
    epochs: int | None = None


class PushDecision(BaseModel):
    pushed: bool
    candidate: str
    model_tag: str | None = None
    reasons: list[str] = Field(default_factory=list)
    production_before: str | None = None
    production_score: float | None = None
    candidate_score: float | None = None


class RunSummary(BaseModel):
    run_id: str
    status: str = Field(description="queued | running | succeeded | failed | broken (its manifest cannot be read)")
    reason: str | None = Field(None, description="why the run failed or is broken")
    created_at: str = ""
    finished_at: str | None = None
    data_uri: str = ""
    current_stage: str | None = None
    progress: Progress = Field(default_factory=Progress)
    best_candidate: str | None = None
    val_roc_auc: float | None = None
    test_accuracy: float | None = None
    pushed: bool | None = None
    model_tag: str | None = None


class RunDetail(RunSummary):
    stages: dict[str, StageInfo] = Field(default_factory=dict)
    candidates: dict[str, CandidateScores] = Field(default_factory=dict)
    selection_metric: str | None = None
    push: PushDecision | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    code: dict[str, Any] = Field(default_factory=dict)
    pid: int | None = None
    host: str | None = None
    plots: dict[str, str] = Field(default_factory=dict, description="plot name -> URL of the PNG")
    gradcam: list[str] = Field(default_factory=list, description="URLs of the Grad-CAM galleries")
    problems: list[str] = Field(default_factory=list, description="artifacts that could not be read")


class VerifyResult(BaseModel):
    run_id: str
    ok: bool = Field(description="no problem found (a run that is still going has none yet)")
    sealed: bool = Field(description="false while the run is queued or running: it is sealed when it ends")
    checked: int = Field(description="files re-hashed")
    problems: list[str]
    message: str
    seal_digest: str | None = None
    evidence_digest: str | None = Field(None, description="the pre-push seal a pushed model names in its metadata")


class CancelAccepted(BaseModel):
    run_id: str
    status: str = Field(description="cancelling: SIGTERM was sent to the worker")


class ReasonOut(BaseModel):
    code: str = Field(description="machine-readable: an input check's code, or ood_score for the model's own score")
    message: str


class PredictionOut(BaseModel):
    label: str
    probabilities: dict[str, float] = Field(description="calibrated (temperature scaling fitted on validation)")
    model: str
    source: str = Field(description="the Bento service or the in-process production model")
    gradcam_png: str | None = Field(None, description="the Grad-CAM overlay as a data:image/png;base64 URI")
    ood_score: float | None = Field(None, description="the model's OOD score; null when ood_gate is unavailable")
    ood_threshold: float | None = Field(None, description="scores above it are refused")
    ood_gate: str = Field("unavailable", description="on, or unavailable for a model pushed before the OOD gate")
    warnings: list[ReasonOut] = Field(default_factory=list, description="checks an operator turned into warnings")
    refused: bool = False


class RefusalOut(BaseModel):
    """HTTP 422: the model will not judge this input, and says why; no label."""

    refused: bool = True
    reasons: list[ReasonOut]
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_gate: str = "unavailable"
    model: str = ""
    warnings: list[ReasonOut] = Field(default_factory=list)


class Health(BaseModel):
    status: str


class ModelsOut(BaseModel):
    """``GET /models``: the store's versions (newest first) and the production pointer's audit log (oldest first)."""

    model_name: str
    production: str | None
    versions: list[dict[str, Any]]
    audit: list[dict[str, Any]]
