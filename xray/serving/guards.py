"""ASGI guards in front of the Bento: bearer tokens, upload size and multipart shape, as JSON 4xx answers."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.responses import JSONResponse

from xray.audit.tokens import matches_any


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ServeTokenGuard:
    """401 on the guarded routes unless the request carries ``Authorization: Bearer <serve token>``.

    Runs in front of everything BentoML serves (its ``/metrics`` included), so
    the model's outputs and its metadata need the token once one is set; the
    health probes (``/livez``, ``/readyz``) stay open for the orchestrator.
    """

    def __init__(self, app: Any, tokens: tuple[str, ...], routes: tuple[str, ...]) -> None:
        self.app = app
        self.tokens = tokens
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.tokens or scope.get("path", "").rstrip("/") not in self.routes:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip() and matches_any(token.strip().encode(), self.tokens):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "this route needs 'Authorization: Bearer <token>' with a token from XRAY_SERVE_TOKENS"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


class UploadGuard:
    """ASGI middleware in front of the upload APIs, so bad requests get 4xx, not BentoML's 500.

    Any body above ``max_bytes`` gets 413 (a declared ``Content-Length`` is
    refused unread; a chunked body is read only up to the limit). On the
    upload routes the multipart form is parsed once here and refused with
    400/415 where BentoML's own parser would raise (no or broken multipart, a
    text ``image`` field, which it would try to fetch as a URL, or a file under
    another field name, which it would try to decode as JSON), then the
    buffered body is replayed to the app.
    """

    def __init__(self, app: Any, max_bytes: int, upload_routes: tuple[str, ...], file_field: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_routes = upload_routes
        self.file_field = file_field

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        upload = scope.get("path") in self.upload_routes
        if declared is not None and not upload:
            await self.app(scope, receive, send)
            return

        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if upload and (problem := await self._form_problem(headers, body)) is not None:
            await error_response(*problem)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _form_problem(self, headers: Headers, body: bytes) -> tuple[int, str] | None:
        field = self.file_field
        if headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return 415, f"send the image as a multipart/form-data file field named {field!r}"

        async def stream() -> AsyncGenerator[bytes, None]:
            yield body

        try:
            form = await MultiPartParser(headers, stream(), max_files=4, max_fields=16).parse()
        except Exception as exc:  # noqa: BLE001 - whatever the parser trips over is a malformed request
            return 400, f"malformed multipart/form-data body: {exc}"
        try:
            images = form.getlist(field)
            stray = [name for name, value in form.multi_items() if isinstance(value, UploadFile) and name != field]
            if stray:
                return 400, f"unexpected file field {stray[0]!r}: send the image as field {field!r}"
            if not images:
                return 400, f"the multipart field {field!r} (the image file) is missing"
            if len(images) > 1:
                return 400, f"send one image per request (got {len(images)} {field!r} fields)"
            if not isinstance(images[0], UploadFile):
                return 400, f"field {field!r} must be a file upload, not a text value"
            return None
        finally:
            await form.close()

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        await error_response(413, message)(scope, receive, send)
