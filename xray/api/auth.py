"""Bearer tokens with three roles, for the API and (through a login cookie) for the pages.

``admin`` may do what ``train`` may and also override server-held config
(gate, push, S3, weights: see ``xray.api.policy``); ``train`` may start and
cancel runs and read everything; ``read`` may only read. A client that sends
too many wrong tokens gets 429 until its window passes. Tokens are compared
with ``hmac.compare_digest`` against every configured token, so the time
taken says nothing about which one nearly matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from xray.api.settings import AppSettings, Tokens
from xray.audit.tokens import matches_any

READ = "read"
TRAIN = "train"
ADMIN = "admin"
MAY_TRAIN = (TRAIN, ADMIN)
COOKIE_NAME = "xray_token"
NO_TRAIN_TOKEN = (
    "training is disabled: no train token is configured; set XRAY_TRAIN_TOKENS (comma-separated tokens) "
    "or XRAY_TOKENS_FILE (YAML with a 'train:' list) and restart the service"
)
_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}

bearer_scheme = HTTPBearer(
    auto_error=False,
    description=(
        "A token from XRAY_ADMIN_TOKENS (any override), XRAY_TRAIN_TOKENS (train with the allowed overrides, "
        "and read) or XRAY_READ_TOKENS (read only)."
    ),
)


@dataclass(frozen=True)
class Principal:
    role: str  # admin | train | read
    via: str  # bearer | cookie


class LoginRequired(Exception):
    """A page was asked for without a usable token: the browser is sent to the login form."""

    def __init__(self, next_url: str, message: str = "") -> None:
        super().__init__(message)
        self.next_url = next_url
        self.message = message


def role_of(token: str, tokens: Tokens) -> str | None:
    """The strongest role the token grants, or None."""
    candidate = token.encode()
    is_admin = matches_any(candidate, tokens.admin)
    is_train = matches_any(candidate, tokens.train)
    is_read = matches_any(candidate, tokens.read)
    if is_admin:
        return ADMIN
    if is_train:
        return TRAIN
    return READ if is_read else None


def client_key(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def too_many_failures(request: Request) -> HTTPException | None:
    """429 with Retry-After while this client is over its failed-attempt budget."""
    wait = request.app.state.auth_limiter.retry_after(client_key(request))
    if wait is None:
        return None
    return HTTPException(
        status_code=429,
        detail=f"too many failed token attempts from this client; try again in {wait} s",
        headers={"Retry-After": str(wait)},
    )


def checked_role(request: Request, token: str) -> str | None:
    """``role_of`` that counts a failure against the client when the token grants nothing."""
    granted = role_of(token, request.app.state.settings.tokens)
    if granted is None:
        request.app.state.auth_limiter.record_failure(client_key(request))
    return granted


def _settings(request: Request) -> AppSettings:
    return request.app.state.settings


def _token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> tuple[str | None, str]:
    if credentials is not None and credentials.credentials:
        return credentials.credentials, "bearer"
    cookie = request.cookies.get(COOKIE_NAME)
    return (cookie, "cookie") if cookie else (None, "")


def _same_origin(request: Request) -> bool:
    """A cookie-authenticated POST must come from our own pages (SameSite=Strict is the first line)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return True  # not a browser's cross-site form post, which always says where it came from
    return origin != "null" and urlsplit(origin).netloc == request.headers.get("host", "")


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": challenge})


def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None, role: str) -> Principal:
    settings = _settings(request)
    if role == TRAIN and not (settings.tokens.train or settings.tokens.admin):
        raise HTTPException(status_code=503, detail=NO_TRAIN_TOKEN)
    token, via = _token(request, credentials)
    if token is None:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    limited = too_many_failures(request)
    if limited is not None:
        raise limited
    granted = checked_role(request, token)
    if granted is None:
        raise _unauthorized("invalid token", error="invalid_token")
    if role == TRAIN and granted not in MAY_TRAIN:
        raise HTTPException(
            status_code=403, detail="this token may only read; starting or cancelling runs needs a train token"
        )
    if via == "cookie" and request.method in _UNSAFE and not _same_origin(request):
        raise HTTPException(status_code=403, detail="cross-origin request refused")
    return Principal(role=granted, via=via)


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def require_read(request: Request, credentials: BearerCredentials) -> Principal:
    return authenticate(request, credentials, READ)


def require_train(request: Request, credentials: BearerCredentials) -> Principal:
    return authenticate(request, credentials, TRAIN)


def page_principal(request: Request, role: str = READ) -> Principal:
    """Like the API check, but a browser without a usable token is sent to the login form."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    header = (
        HTTPAuthorizationCredentials(scheme=scheme, credentials=value.strip()) if scheme.lower() == "bearer" else None
    )
    try:
        return authenticate(request, header, role)
    except HTTPException as exc:
        if exc.status_code == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise LoginRequired(target, str(exc.detail)) from None
        raise


def page_reader(request: Request) -> Principal:
    return page_principal(request, READ)


def page_trainer(request: Request) -> Principal:
    return page_principal(request, TRAIN)


def safe_next(url: str | None) -> str:
    """Only local paths: never an open redirect to another site."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/ui/runs"
    return url


def login_url(next_url: str) -> str:
    return f"/login?next={quote(safe_next(next_url), safe='/')}"
