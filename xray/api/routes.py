"""The JSON API: start and follow training runs, download their artifacts, predict."""

from __future__ import annotations

import base64
import logging
import mimetypes
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile as ReceivedFile

from xray.api.auth import ADMIN, Principal, require_read, require_train
from xray.api.jobs import NotActive, TrainingConflict, WorkerStartError, tail_lines
from xray.api.policy import Forbidden
from xray.api.predict import BadUpload, PredictionResult, PredictionUnavailable, Refused, check_upload
from xray.api.schemas import (
    CancelAccepted,
    ConflictOut,
    ErrorOut,
    Health,
    ModelsOut,
    PredictionOut,
    ReasonOut,
    RefusalOut,
    RunDetail,
    RunSummary,
    TrainAccepted,
    TrainRequest,
    VerifyResult,
)
from xray.api.views import load_view, summary
from xray.audit import registry
from xray.errors import ConfigError, DataError, RunError, XrayError
from xray.audit.keys import SigningKeyError
from xray.audit.run_diff import RunDiff, diff_runs
from xray.audit.seal import verify_run
from xray.pipeline.store import RunManifest, run_ids
from xray.typed import to_jsonable

logger = logging.getLogger(__name__)

router = APIRouter()

_AUTH_ERRORS = {
    401: {"model": ErrorOut, "description": "missing or invalid token"},
    403: {"model": ErrorOut, "description": "the token's role does not allow this"},
}
_NOT_FOUND = {404: {"model": ErrorOut, "description": "no such run or file"}}
NAME_MAX = 255  # bytes in one path segment on Linux file systems
_INLINE_TYPES = ("image/png", "image/jpeg", "text/plain", "application/json")


def jobs(request: Request):
    return request.app.state.jobs


def get_manifest(request: Request, run_id: str) -> RunManifest:
    try:
        return jobs(request).get(run_id)
    except RunError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


@router.get("/healthz", response_model=Health, tags=["service"], summary="liveness (no auth)")
def healthz() -> Health:
    return Health(status="ok")


@router.post(
    "/train",
    status_code=202,
    response_model=TrainAccepted,
    tags=["training"],
    summary="start a training run in a worker process",
    responses={
        **_AUTH_ERRORS,
        400: {"model": ErrorOut, "description": "the data URI does not exist or is not supported"},
        403: {
            "model": ErrorOut,
            "description": "a read token; an override only an admin token may send; data outside the data roots",
        },
        409: {"model": ConflictOut, "description": "a run is already queued or running"},
        422: {"description": "malformed body, or an override the config rejects"},
        503: {"model": ErrorOut, "description": "no train token configured, or the worker could not start"},
    },
)
def train(
    request: Request,
    principal: Annotated[Principal, Depends(require_train)],
    body: TrainRequest | None = None,
) -> JSONResponse:
    """Validates the config first: a forbidden or bad override or missing data creates no run."""
    body = body or TrainRequest()
    manager = jobs(request)
    try:
        config = manager.validate(body.data, body.overrides, admin=principal.role == ADMIN)
    except Forbidden as exc:
        raise HTTPException(status_code=403, detail=str(exc)) from None
    except ConfigError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except DataError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    try:
        manifest = manager.start(config, body.overrides)
    except TrainingConflict as exc:
        return JSONResponse(status_code=409, content={"detail": str(exc), "run_id": exc.active.run_id})
    except WorkerStartError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    url = f"/runs/{manifest.run_id}"
    accepted = TrainAccepted(run_id=manifest.run_id, status=manifest.status, url=url)
    return JSONResponse(status_code=202, content=accepted.model_dump(), headers={"Location": url})


@router.get(
    "/runs", response_model=list[RunSummary], tags=["runs"], summary="all runs, newest first", responses=_AUTH_ERRORS
)
def runs(request: Request, _: Annotated[Principal, Depends(require_read)]) -> list[RunSummary]:
    return run_summaries(request)


def run_summaries(request: Request) -> list[RunSummary]:
    """Newest first; a run whose manifest cannot be read is listed as broken instead of failing the list."""
    manager = jobs(request)
    listed = []
    for run_id in reversed(run_ids(manager.root)):
        try:
            listed.append(summary(manager.get(run_id)))
        except (RunError, ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            listed.append(RunSummary(run_id=run_id, status="broken", reason=f"unreadable run: {exc}"))
    return listed


@router.get(
    "/runs/{run_id}",
    response_model=RunDetail,
    tags=["runs"],
    summary="status, stage, epoch progress, metrics and push decision of one run",
    responses={**_AUTH_ERRORS, **_NOT_FOUND},
)
def run_detail(request: Request, run_id: str, _: Annotated[Principal, Depends(require_read)]) -> RunDetail:
    manifest = get_manifest(request, run_id)
    return load_view(jobs(request).root, manifest).detail


@router.get(
    "/runs/{run_id}/log",
    response_class=PlainTextResponse,
    tags=["runs"],
    summary="the last lines of the run's log",
    responses={**_AUTH_ERRORS, **_NOT_FOUND},
)
def run_log(
    request: Request,
    run_id: str,
    _: Annotated[Principal, Depends(require_read)],
    lines: Annotated[int, Query(ge=1, le=100_000)] = 200,
) -> PlainTextResponse:
    manifest = get_manifest(request, run_id)
    run_path = jobs(request).root / manifest.run_id
    for name in ("run.log", "worker.log"):  # a queued run has only the worker's output so far
        if (run_path / name).is_file():
            return PlainTextResponse(tail_lines(run_path / name, lines))
    return PlainTextResponse("")


@router.get(
    "/runs/{run_id}/verify",
    response_model=VerifyResult,
    tags=["runs"],
    summary="check the run's seal, ledger entry and every file",
    responses={**_AUTH_ERRORS, **_NOT_FOUND},
)
def run_verify(request: Request, run_id: str, _: Annotated[Principal, Depends(require_read)]) -> VerifyResult:
    manifest = get_manifest(request, run_id)
    return verify(request, manifest.run_id)


def verify(request: Request, run_id: str) -> VerifyResult:
    """The same check as ``xray runs verify``, with the service's own signing key."""
    try:
        result = verify_run(jobs(request).root, run_id)
    except SigningKeyError as exc:  # the service's key is missing or unreadable: its fault, not the caller's
        raise HTTPException(status_code=503, detail=f"cannot verify: {exc}") from None
    return VerifyResult(
        run_id=run_id, ok=result.ok, sealed=result.sealed, checked=result.checked, problems=list(result.problems),
        message=result.message, seal_digest=result.seal_digest, evidence_digest=result.evidence_digest,
    )


def resolve_artifact(root: Path, run_id: str, relative: str) -> Path:
    """A file inside the run directory, or HTTPException: no ``..``, no absolute paths, no symlinks out."""
    if not relative or relative.startswith(("/", "\\")) or "\x00" in relative:
        raise HTTPException(status_code=400, detail="artifact path must be relative to the run directory")
    parts = relative.replace("\\", "/").split("/")
    if any(part in ("..", ".") for part in parts):
        raise HTTPException(status_code=400, detail="artifact path must not contain '.' or '..' segments")
    if any(len(part.encode()) > NAME_MAX for part in parts):
        raise HTTPException(status_code=400, detail=f"artifact path has a segment over {NAME_MAX} bytes")
    missing = HTTPException(status_code=404, detail=f"no file {relative[:200]!r} in run {run_id}")
    try:
        run_dir = (root / run_id).resolve()
        target = (run_dir / relative).resolve()
        if not target.is_relative_to(run_dir):
            raise HTTPException(status_code=403, detail="artifact path leads outside the run directory")
        if not target.is_file():
            raise missing
    except OSError:  # a path too long for the file system, a loop of links
        raise missing from None
    return target


@router.get(
    "/runs/{run_id}/artifacts/{path:path}",
    response_class=FileResponse,
    tags=["runs"],
    summary="download one file of a run",
    responses={**_AUTH_ERRORS, **_NOT_FOUND, 400: {"model": ErrorOut}, 200: {"content": {"*/*": {}}}},
)
def run_artifact(
    request: Request, run_id: str, path: str, _: Annotated[Principal, Depends(require_read)]
) -> FileResponse:
    manifest = get_manifest(request, run_id)
    target = resolve_artifact(jobs(request).root, manifest.run_id, path)
    media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix in (".log", ".md", ".jsonl"):
        media_type = "text/plain"
    inline = media_type in _INLINE_TYPES
    return FileResponse(
        target,
        media_type=media_type,
        filename=target.name,
        content_disposition_type="inline" if inline else "attachment",
        headers={"Content-Security-Policy": "sandbox; default-src 'none'", "X-Content-Type-Options": "nosniff"},
    )


@router.post(
    "/runs/{run_id}/cancel",
    status_code=202,
    response_model=CancelAccepted,
    tags=["training"],
    summary="stop a queued or running run (SIGTERM to its worker)",
    responses={**_AUTH_ERRORS, **_NOT_FOUND, 409: {"model": ErrorOut, "description": "the run has finished"}},
)
def cancel(request: Request, run_id: str, _: Annotated[Principal, Depends(require_train)]) -> CancelAccepted:
    get_manifest(request, run_id)
    try:
        manifest = jobs(request).cancel(run_id)
    except NotActive as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return CancelAccepted(run_id=manifest.run_id, status="cancelling")


@router.get(
    "/models",
    response_model=ModelsOut,
    tags=["models"],
    summary="stored model versions, which is production, and the production pointer's audit log",
    responses=_AUTH_ERRORS,
)
def models(request: Request, _: Annotated[Principal, Depends(require_read)]) -> ModelsOut:
    return models_view(request)


def models_view(request: Request) -> ModelsOut:
    name = request.app.state.settings.model_name
    try:
        return ModelsOut(
            model_name=name,
            production=registry.production_tag(name),
            versions=[to_jsonable(row) for row in registry.list_models(name)],
            audit=[to_jsonable(entry) for entry in registry.read_audit_log(model=name)],
        )
    except XrayError as exc:  # a damaged audit log: say so, do not guess the pointer
        raise HTTPException(status_code=503, detail=str(exc)) from None


@router.get(
    "/runs/{run_a}/diff/{run_b}",
    response_model=RunDiff,
    tags=["runs"],
    summary="config keys that differ, same data and code?, metric deltas, push decisions side by side",
    responses={**_AUTH_ERRORS, **_NOT_FOUND},
)
def runs_diff(
    request: Request, run_a: str, run_b: str, _: Annotated[Principal, Depends(require_read)]
) -> RunDiff:
    return diff_view(request, run_a, run_b)


def diff_view(request: Request, run_a: str, run_b: str) -> RunDiff:
    try:
        return diff_runs(jobs(request).root, run_a, run_b)
    except RunError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


def prediction_out(result: PredictionResult) -> PredictionOut:
    overlay = None
    if result.gradcam_png is not None:
        overlay = "data:image/png;base64," + base64.b64encode(result.gradcam_png).decode()
    return PredictionOut(
        label=result.label,
        probabilities=result.probabilities,
        model=result.model,
        source=result.source,
        gradcam_png=overlay,
        ood_score=result.ood_score,
        ood_threshold=result.ood_threshold,
        ood_gate=result.ood_gate,
        warnings=[ReasonOut(**w) for w in result.warnings],
    )


def run_prediction(request: Request, image: UploadFile | None) -> PredictionResult:
    """BadUpload / PredictionUnavailable for everything the caller or the setup can fix."""
    if image is None or not isinstance(image, ReceivedFile):
        raise BadUpload("no image: send a PNG, JPEG or DICOM file as the multipart file field 'image'")
    limit = request.app.state.settings.max_upload_bytes
    data = image.file.read(limit + 1)
    check_upload(data, limit)
    return request.app.state.predictor.predict(data, image.filename or "upload", image.content_type)


@router.post(
    "/predict",
    response_model=PredictionOut,
    tags=["predict"],
    summary="classify one radiograph and explain it (Grad-CAM)",
    responses={
        **_AUTH_ERRORS,
        400: {"model": ErrorOut, "description": "not a readable image"},
        413: {"model": ErrorOut, "description": "more bytes or pixels than the limits"},
        415: {"model": ErrorOut, "description": "an image format other than PNG, JPEG or TIFF"},
        422: {"model": RefusalOut, "description": "refused: not an input the model can judge (reasons given)"},
        503: {"model": ErrorOut, "description": "no production model, or the Bento service is down"},
    },
)
def predict(
    request: Request,
    _: Annotated[Principal, Depends(require_read)],
    image: Annotated[UploadFile | None, File(description="PNG, JPEG or DICOM radiograph")] = None,
) -> PredictionOut:
    try:
        return prediction_out(run_prediction(request, image))
    except Refused as exc:
        return JSONResponse(RefusalOut.model_validate(exc.body).model_dump(), status_code=422)  # type: ignore[return-value]
    except BadUpload as exc:
        raise HTTPException(status_code=exc.status_code, detail=str(exc)) from None
    except PredictionUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
