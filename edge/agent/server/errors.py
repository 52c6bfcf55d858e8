"""Every error becomes an HTTP response here, and only here.

KServe routes answer ``{"error": "..."}``; OpenAI routes (``/v1/...``) answer OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. The status comes from the class of the
:class:`~edge.errors.EdgeError` (nearest ancestor in :data:`STATUS`), or from a Starlette
``HTTPException`` for plain HTTP problems (no route, wrong method, body too large).
"""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from edge import errors as e

log = logging.getLogger(__name__)

# HTTP status per error class; a subclass not listed takes its nearest listed ancestor.
STATUS: dict[type[e.EdgeError], int] = {
    e.EdgeError: 500,
    e.ConfigError: 400,
    e.NotFoundError: 404,
    e.ModelSourceError: 400,
    e.ExportError: 500,
    e.BundleError: 400,
    e.CompatibilityError: 409,
    e.StoreError: 409,
    e.ResourceError: 429,
    e.InferenceError: 500,
    e.RequestError: 400,
    e.UnavailableError: 503,
    e.TransportError: 502,
}

# Seconds a client should wait before retrying a 429 or 503: one batch or one model load is
# typically well under this, and a longer wait would idle the device.
RETRY_AFTER_S = 1

# OpenAI's error "type" per status, as the OpenAI API and vLLM spell them.
OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}

# Stable codes for HTTP-level problems that carry no EdgeError.
HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def http_status(exc: e.EdgeError) -> int:
    """Return the HTTP status for an error, from its nearest listed class."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, status: int, message: str, code: str) -> Response:
    """Build the error body the route's protocol expects, and count it."""
    context = getattr(request.app.state, "context", None)
    if context is not None:
        context.metrics.observe_http_error(status)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    if _is_openai(request):
        body = {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(status, "server_error"),
                "param": None,
                "code": code,
            }
        }
    else:
        body = {"error": message}
    return Response(json.dumps(body), status, headers, media_type="application/json")


async def handle_edge_error(request: Request, exc: Exception) -> Response:
    """Answer an EdgeError with its status and message."""
    assert isinstance(exc, e.EdgeError)
    status = http_status(exc)
    if status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return error_response(request, status, str(exc), exc.code)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Answer Starlette's HTTPException (no route, wrong method, body too large)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code < 400:  # pragma: no cover - we raise none below 400
        return Response(status_code=exc.status_code, headers=exc.headers)
    message = exc.detail or "error"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(request, exc.status_code, message, HTTP_CODES.get(exc.status_code, "http_error"))


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """Note a client that left (or was cut off as too slow) before its body was in; nobody hears an answer."""
    log.info("%s %s: the client left before its request body was complete", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request": never sent, the connection is gone


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Answer a bug with a 500 and log it; the server keeps running."""
    log.error("%s %s raised %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def exception_handlers() -> dict:
    """Return the handlers to install on the Starlette app."""
    return {e.EdgeError: handle_edge_error, HTTPException: handle_http_exception,
            ClientDisconnect: handle_client_disconnect, Exception: handle_unexpected}
