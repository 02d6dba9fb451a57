"""Server-rendered pages for auditors and engineers: runs, one run in full, and a predict form.

Same data as the JSON API (``views.load_view``), same tokens (from a login
cookie: HttpOnly, SameSite=Strict), no JavaScript and no front-end build.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup

from xray.api.auth import (
    COOKIE_NAME,
    MAY_TRAIN,
    Principal,
    checked_role,
    page_reader,
    page_trainer,
    safe_next,
    too_many_failures,
)
from xray.api.jobs import ACTIVE, NotActive
from xray.api.predict import BadUpload, PredictionUnavailable, Refused
from xray.api.routes import diff_view, get_manifest, jobs, models_view, run_prediction, run_summaries, verify
from xray.api.views import load_view

logger = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
# The pages need no script at all; images come from our own routes or data: URIs (Grad-CAM results).
PAGE_CSP = "default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; frame-ancestors 'none'"

router = APIRouter(include_in_schema=False)


def _filesize(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


TEMPLATES.env.filters["filesize"] = _filesize
TEMPLATES.env.filters["metric"] = _pct


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    principal = context.get("principal")
    response = TEMPLATES.TemplateResponse(request, name, {"principal": principal, **context}, status_code=status_code)
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/runs", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/ui/runs") -> HTMLResponse:
    return render(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request, token: Annotated[str, Form(max_length=4096)] = "", next: Annotated[str, Form()] = "/ui/runs"
) -> Response:
    settings = request.app.state.settings
    limited = too_many_failures(request)
    if limited is not None:
        raise limited
    if not token or checked_role(request, token.strip()) is None:
        return render(request, "login.html", {"next": safe_next(next), "error": "invalid token"}, status_code=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        token.strip(),
        max_age=settings.session_hours * 3600,
        path="/",
        httponly=True,
        samesite="strict",
        secure=settings.cookie_secure,
    )
    return response


@router.post("/logout")
def logout() -> RedirectResponse:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/")
    return response


@router.get("/ui/runs", response_class=HTMLResponse)
def runs_page(request: Request, principal: Annotated[Principal, Depends(page_reader)]) -> HTMLResponse:
    runs = run_summaries(request)
    active = any(r.status in ACTIVE for r in runs)
    return render(request, "runs.html", {"principal": principal, "runs": runs, "refresh": active})


def markdown_html(text: str) -> Markup:
    """CommonMark with tables; raw HTML in the source (a CSV value, say) is escaped, not rendered."""
    return Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request, run_id: str, principal: Annotated[Principal, Depends(page_reader)], verify_files: int = 0
) -> HTMLResponse:
    manifest = get_manifest(request, run_id)
    view = load_view(jobs(request).root, manifest)
    verification = verify(request, manifest.run_id) if verify_files else None
    evaluation = view.artifacts.get("model_evaluation")
    card_file = jobs(request).root / manifest.run_id / evaluation.model_card_markdown if evaluation else None
    context = {
        "model_card": markdown_html(card_file.read_text()) if card_file and card_file.is_file() and card_file.suffix == ".md" else None,
        "principal": principal,
        "run": view.detail,
        "manifest": manifest,
        "evaluation": evaluation,
        "external": view.external,
        "lineage": view.lineage,
        "verification": verification,
        "config_yaml": yaml.safe_dump(manifest.config, sort_keys=False, default_flow_style=False),
        "environment": manifest.environment,
        "refresh": manifest.status in ACTIVE and not verify_files,
        "can_cancel": manifest.status in ACTIVE and principal.role in MAY_TRAIN,
    }
    return render(request, "run.html", context)


@router.post("/ui/runs/{run_id}/cancel")
def cancel_page(
    request: Request, run_id: str, principal: Annotated[Principal, Depends(page_trainer)]
) -> RedirectResponse:
    get_manifest(request, run_id)
    try:
        jobs(request).cancel(run_id)
    except NotActive as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return RedirectResponse(f"/ui/runs/{run_id}", status_code=303)


@router.get("/ui/models", response_class=HTMLResponse)
def models_page(request: Request, principal: Annotated[Principal, Depends(page_reader)]) -> HTMLResponse:
    view = models_view(request)
    return render(request, "models.html", {"principal": principal, "view": view, "audit": list(reversed(view.audit))})


@router.get("/ui/diff", response_class=HTMLResponse)
def diff_page(
    request: Request, principal: Annotated[Principal, Depends(page_reader)], a: str = "", b: str = ""
) -> HTMLResponse:
    runs = [m.run_id for m in reversed(jobs(request).runs())]
    diff = diff_view(request, a, b) if a and b else None
    return render(request, "diff.html", {"principal": principal, "runs": runs, "a": a, "b": b, "diff": diff})


@router.get("/ui/predict", response_class=HTMLResponse)
def predict_page(request: Request, principal: Annotated[Principal, Depends(page_reader)]) -> HTMLResponse:
    return render(request, "predict.html", {"principal": principal, **_predict_context(request)})


@router.post("/ui/predict", response_class=HTMLResponse)
def predict_submit(
    request: Request,
    principal: Annotated[Principal, Depends(page_reader)],
    image: Annotated[UploadFile | None, File()] = None,
) -> HTMLResponse:
    context: dict[str, Any] = {"principal": principal, **_predict_context(request)}
    try:
        result = run_prediction(request, image)
    except BadUpload as exc:
        return render(
            request, "predict.html", {**context, "error": f"That upload cannot be used: {exc}"}, exc.status_code
        )
    except PredictionUnavailable as exc:
        return render(request, "predict.html", {**context, "error": str(exc)}, 503)
    except Refused as exc:
        refusal = {**exc.body, "filename": image.filename if image else ""}
        return render(request, "predict.html", {**context, "refusal": refusal}, 422)
    ranked = sorted(result.probabilities.items(), key=lambda kv: kv[1], reverse=True)
    overlay = base64.b64encode(result.gradcam_png).decode() if result.gradcam_png else None
    return render(
        request,
        "predict.html",
        {
            **context,
            "result": result,
            "ranked": ranked,
            "overlay": overlay,
            "filename": image.filename if image else "",
        },
    )


def _predict_context(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    backend = f"Bento service at {settings.bento_url}" if settings.bento_url else "the production model, in-process"
    return {"backend": backend, "error": None, "result": None, "refusal": None}
