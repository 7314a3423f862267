"""Errors as HTTP responses in OpenAI's JSON shape, and the exception handlers that produce them.

Every error the API returns, including unknown routes and malformed JSON, has the body
`{"error": {"message", "type", "param", "code"}}` that the `openai` client turns into its typed
exceptions. `error_status(exc)` is the one table from ember's exceptions to HTTP statuses:

    InvalidRequestError, ConfigError, RequestError   400 invalid_request_error (param named)
    AuthenticationError                              401 invalid_api_key
    ModelNotFoundError                               404 model_not_found (param "model")
    QueueFullError                                   429 queue_full (Retry-After: 1)
    RequestTimeoutError                              504 timeout
    DeploymentError, InstanceLostError               503 deployment_unavailable
    RequestQuarantinedError                          500 request_quarantined (not resumed)
    anything else                                    500 internal_error (logged with traceback)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.errors import (
    AuthenticationError,
    ConfigError,
    DeploymentError,
    EmberError,
    InstanceLostError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    RequestError,
    RequestQuarantinedError,
    RequestTimeoutError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    status: int
    type: str
    code: str | None
    param: str | None = None


def error_status(exc: BaseException) -> ErrorInfo:
    """How an exception shows over HTTP: status, OpenAI error type, code and param."""
    if isinstance(exc, InvalidRequestError):
        return ErrorInfo(400, "invalid_request_error", "invalid_value", exc.param)
    if isinstance(exc, ConfigError | RequestError):
        return ErrorInfo(400, "invalid_request_error", "invalid_value")
    if isinstance(exc, AuthenticationError):
        return ErrorInfo(401, "invalid_request_error", "invalid_api_key")
    if isinstance(exc, ModelNotFoundError):
        return ErrorInfo(404, "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, QueueFullError):
        return ErrorInfo(429, "rate_limit_error", "queue_full")
    if isinstance(exc, RequestTimeoutError):
        return ErrorInfo(504, "timeout_error", "timeout")
    if isinstance(exc, DeploymentError | InstanceLostError):
        return ErrorInfo(503, "service_unavailable_error", "deployment_unavailable")
    if isinstance(exc, RequestQuarantinedError):
        return ErrorInfo(500, "server_error", "request_quarantined")
    return ErrorInfo(500, "internal_error", "internal_error")


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif status in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(
        error_body(message, type_, param, code), status_code=status, headers=headers
    )


def exception_message(exc: BaseException) -> str:
    if isinstance(exc, ModelNotFoundError):
        return str(exc) or "model not found"
    if isinstance(exc, EmberError):
        return str(exc)
    return "internal server error"


def exception_response(exc: BaseException) -> JSONResponse:
    info = error_status(exc)
    if info.status >= 500 and not isinstance(exc, EmberError):
        logger.error("unhandled error in request", exc_info=exc)
    return error_response(info.status, exception_message(exc), info.type, info.param, info.code)


def sse_error_event(exc: BaseException) -> str:
    """An error raised after a stream began: one SSE event the openai client raises as APIError."""
    info = error_status(exc)
    body = error_body(exception_message(exc), info.type, info.param, info.code)
    return f"data: {json.dumps(body)}\n\n"


def validation_error_param(error: dict[str, Any]) -> str | None:
    """The OpenAI `param` of one pydantic error: `messages[0].content`, or the name a model
    validator put before the colon of its message."""
    loc = [x for x in error.get("loc", ()) if x != "body"]
    # pydantic adds the union member's type name (`str`, `list[int]`) to the location; drop it.
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int):
            if parts:
                parts[-1] += f"[{x}]"
        elif isinstance(x, str) and x.isidentifier():
            parts.append(x)
    msg = str(error.get("msg", ""))
    if not parts and error.get("type") == "value_error":
        head = msg.removeprefix("Value error, ").split(":", 1)[0]
        if head.isidentifier():
            return head
    return ".".join(parts) or None


def _validation_message(error: dict[str, Any], param: str | None) -> str:
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        return "request body is not valid JSON"
    if error.get("type") == "missing":
        return f"missing required parameter: {param}"
    if param and not msg.startswith(f"{param}:"):
        return f"{param}: {msg}"
    return msg


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through OpenAI's error shape."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        param = validation_error_param(first)
        return error_response(
            400, _validation_message(first, param), "invalid_request_error", param, "invalid_value"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"not found: {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return error_response(exc.status_code, message, "invalid_request_error", None, code)

    @app.exception_handler(EmberError)
    async def _on_ember(_: Request, exc: EmberError) -> JSONResponse:
        return exception_response(exc)

    @app.exception_handler(Exception)
    async def _on_any(_: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)
