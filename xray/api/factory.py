"""``create_app(settings)``: the FastAPI app with its state (jobs, predictor) set up in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from xray.api import pages, routes
from xray.api.auth import LoginRequired, login_url
from xray.api.jobs import JobManager
from xray.api.limits import BodySizeLimit
from xray.api.predict import make_predictor
from xray.api.ratelimit import FailedAuthLimiter
from xray.api.settings import AppSettings

logger = logging.getLogger(__name__)

_TITLES = {
    400: "Bad request",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported image format",
    429: "Too many attempts",
    503: "Unavailable",
}
# Swagger UI's script and stylesheet from an installed package: /docs works on an offline network.
SWAGGER_ASSETS = Path(fastapi_offline.__file__).parent / "static"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and form fields around an upload
DESCRIPTION = """Training service for the chest X-ray classifier.

* `POST /train` starts the pipeline in a worker process (one at a time) and answers `202` with the run id.
* `GET /runs/{id}` follows it: status, stage, epoch progress, metrics, push decision.
* Runs live in the artifacts directory: the app can restart without losing them.

Authenticate with `Authorization: Bearer <token>`: a **train** token may start and cancel runs
with the allowed overrides, an **admin** token may send any override, a **read** token may only read.
The HTML pages (`/ui/runs`, `/ui/predict`) use a login cookie.
"""


def _is_page(request: Request) -> bool:
    return request.url.path.startswith("/ui/") or request.url.path in ("/login", "/logout", "/")


def create_app(settings: AppSettings) -> FastAPI:
    """One app per settings; nothing global beyond what lives on ``app.state``."""
    app = FastAPI(
        title="xray training service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=_lifespan(settings),
        docs_url=None,  # served below with local assets
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.auth_limiter = FailedAuthLimiter(settings.auth_max_failures, settings.auth_window_s)
    app.include_router(routes.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(SWAGGER_ASSETS)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.middleware("http")(_security_headers)
    # Outermost: bodies are bounded before any parsing or token check.
    app.add_middleware(
        BodySizeLimit,
        upload_limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        other_limit=settings.max_json_bytes,
    )
    return app


def _lifespan(settings: AppSettings):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        jobs = JobManager(settings)
        jobs.reconcile_all()
        app.state.settings = settings
        app.state.jobs = jobs
        app.state.predictor = make_predictor(settings.bento_url, settings.model_name)
        logger.info(
            "xray service: artifacts %s, config %s, predict via %s",
            settings.artifacts_dir,
            settings.config_path or "(defaults)",
            settings.bento_url or "in-process model",
        )
        yield
        left = jobs.children()
        if left:  # they run in their own sessions and finish on their own; their manifests say how
            logger.info(
                "shutting down with training still running: %s", ", ".join(f"{k} (pid {v})" for k, v in left.items())
            )

    return lifespan


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    return RedirectResponse(login_url(exc.next_url), status_code=303)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if _is_page(request) and exc.status_code != 401:
        context = {
            "status_code": exc.status_code,
            "title": _TITLES.get(exc.status_code, "Error"),
            "message": str(exc.detail),
            "principal": None,
        }
        return pages.render(request, "error.html", context, status_code=exc.status_code)
    return await http_exception_handler(request, exc)


async def _invalid(request: Request, exc: Exception) -> Response:
    """An upload that is not a file is the client's mistake about the image: 400 (the page shows it)."""
    assert isinstance(exc, RequestValidationError)
    if request.url.path == "/predict":
        return JSONResponse(
            status_code=400, content={"detail": "send the image as the multipart file field 'image'"}
        )
    if request.url.path == "/ui/predict":
        context = {
            "status_code": 400,
            "title": "Bad upload",
            "principal": None,
            "message": "send the image with the form's file field",
        }
        return pages.render(request, "error.html", context, status_code=400)
    return await request_validation_exception_handler(request, exc)


async def _security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response
