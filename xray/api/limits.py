"""Request bodies are bounded while they stream in: before parsing, before authentication.

FastAPI reads a whole body before it resolves the route's dependencies (the
token check among them), so without a bound an unauthenticated caller could
make the server hold any amount of memory. Starlette's body-limit responder
counts the bytes as they arrive (a declared ``Content-Length`` over the limit
is refused before any is read) and answers 413; this middleware only picks
the limit: uploads (multipart) get more room than everything else.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send


class BodySizeLimit:
    """413 for bodies over ``upload_limit`` (multipart uploads) or ``other_limit`` (everything else)."""

    def __init__(self, app: ASGIApp, upload_limit: int, other_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.other_limit = other_limit

    def limit_for(self, scope: Scope) -> int:
        content_type = Headers(scope=scope).get("content-type", "").lower()
        return self.upload_limit if content_type.startswith("multipart/form-data") else self.other_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await RequestBodyLimitResponder(self.app, self.limit_for(scope))(scope, receive, send)
