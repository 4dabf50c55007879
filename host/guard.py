"""What every request to the host passes first: a loopback Host header, the bearer token, JSON POST bodies
of bounded size. Kernels memorise their experiences, so no other local process or web page may read them.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from host.api import ErrorBody, ErrorDetail

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", *, code: str | None = None, param: str | None = None
) -> JSONResponse:
    """An answer in OpenAI's error shape, which OpenAI clients turn into their typed exceptions."""
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status)


def loopback_host(host: str) -> bool:
    """True for a Host header naming the loopback interface, with or without a port."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8765
        name = name.split("]")[0] + "]"
    elif name.count(":") == 1:
        name = name.split(":")[0]
    return name in LOOPBACK_NAMES


class Guard:
    """ASGI middleware: refuses a request before any route sees it."""

    def __init__(self, app: ASGIApp, token: str, max_body_bytes: int) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        if not loopback_host(headers.get("host", "")):
            # A page whose own host name resolves to 127.0.0.1 (DNS rebinding) sends its name here.
            return error_response(421, "the engrain host answers only requests addressed to 127.0.0.1 or localhost")
        given = headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            response = error_response(
                401,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` (OpenAI clients: "
                "api_key=<token>); the token is ENGRAIN_TOKEN or the file $ENGRAIN_HOME/token",
                code="invalid_api_key",
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        length = headers.get("content-length")
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if (has_body or media) and media != "application/json":
            # Also what stops a browser's form post: it cannot send application/json without a CORS preflight.
            return error_response(415, f"the body must be JSON (Content-Type: application/json), not {media!r}")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return too_large(self.max_body_bytes)
        return None


def too_large(limit: int) -> JSONResponse:
    return error_response(
        413, f"the request body is over {limit} bytes (ENGRAIN_HOST_MAX_BODY_BYTES)", code="request_too_large"
    )


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing one over `limit` bytes even when it came without a Content-Length."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)
