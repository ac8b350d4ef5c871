"""Every gateway error as one JSON shape, and the handlers that produce it.

Errors look like ``{"error": {"code", "message", "field", "limit"}, "request_id"}``: `code` is a
stable machine-readable name, `field` names the offending request field in the client's terms
(``items[3].image``), `limit` the limit that was exceeded (when one was). Nothing ever answers
with a traceback: unexpected exceptions become ``internal_error`` (500) and are logged.

`ApiError` subclasses Starlette's HTTPException on purpose: FastAPI re-raises HTTPExceptions
raised while it reads the body (the streaming body-size check raises one), where any other
exception would be turned into a generic 400.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.gateway.backend import BackendError, BackendTimeout, BackendUnavailable, ModelMismatch
from service.gateway.request_ids import current_request_id, valid_request_id

log = logging.getLogger("service.gateway")


class ApiError(StarletteHTTPException):
    """A request the gateway refuses or cannot serve, with the field and limit involved."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        limit: Any = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.field = field
        self.limit = limit
        self.details = details


def error_body(
    code: str, message: str, request_id: str, field: str | None = None, limit: Any = None
) -> dict[str, Any]:
    return {
        "error": {"code": code, "message": message, "field": field, "limit": limit},
        "request_id": request_id,
    }


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    field: str | None = None,
    limit: Any = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body = error_body(code, message, request_id, field, limit)
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def field_path(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """Pydantic's error location → the client's field name: ("body","items",3,"image") →
    "items[3].image"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI, retry_after_s: int, metrics=None) -> None:
    """Register the handlers that turn every error into the shape above.

    Backend trouble: a timeout is 504 (the backend is there but slow or hung: retrying into it
    at once would only add load), unavailable or serving another export 503; both carry
    Retry-After. `metrics` (GatewayMetrics): each is counted in `refusals` by cause."""

    def refused(cause: str) -> None:
        if metrics is not None:
            metrics.refusals.labels(cause).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status_code,
            exc.code,
            exc.message,
            current_request_id(request),
            field=exc.field,
            limit=exc.limit,
            headers=exc.headers,
            details=exc.details,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):  # subclass: Starlette looks handlers up by MRO anyway
            return await _api_error(request, exc)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # security helper: Allow names every method of the path
            from service.gateway.auth import route_path
            from service.gateway.openapi import allowed_methods  # (openapi imports this module)

            if allowed := allowed_methods(request.app, route_path(request.scope)):
                headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return error_response(
            exc.status_code,
            code,
            str(exc.detail),
            current_request_id(request),
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = exc.body
        if isinstance(body, dict) and (rid := valid_request_id(body.get("request_id"))):
            request.state.request_id = rid
        rid = current_request_id(request)
        errors = exc.errors()
        first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            position = first["loc"][-1] if first.get("loc") else "?"
            message = f"request body is not valid JSON ({ctx.get('error', 'decode error')} at "
            message += f"character {position})"
            return error_response(400, "malformed_json", message, rid)
        field = field_path(first.get("loc", ()))
        message = f"{field or 'request'}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        details = [
            {"field": field_path(e.get("loc", ())), "message": e.get("msg", "")}
            for e in errors[:20]
        ]
        body_out = error_body("invalid_request", message, rid, field)
        body_out["error"]["details"] = details
        return JSONResponse(body_out, status_code=422)

    @app.exception_handler(BackendUnavailable)  # ModelMismatch, BackendTimeout: subclasses
    async def _unavailable(request: Request, exc: BackendUnavailable) -> JSONResponse:
        status = 503
        if isinstance(exc, BackendTimeout):
            log.warning("backend timed out: %s", exc)
            status, code = 504, "backend_timeout"
            message = f"the reward backend did not answer in time, retry later ({exc})"
        elif isinstance(exc, ModelMismatch):
            log.error("refusing to score: %s", exc)
            code, message = "model_mismatch", f"refusing to score: {exc}"
        else:
            log.warning("backend unavailable: %s", exc)
            code, message = (
                "backend_unavailable",
                f"the reward backend is unavailable, retry later ({exc})",
            )
        refused(code)
        return error_response(
            status,
            code,
            message,
            current_request_id(request),
            headers={"Retry-After": str(retry_after_s)},
        )

    @app.exception_handler(BackendError)
    async def _backend_error(request: Request, exc: BackendError) -> JSONResponse:
        log.error("backend error: %s", exc)
        return error_response(
            502, "backend_error", f"the reward backend failed: {exc}", current_request_id(request)
        )
