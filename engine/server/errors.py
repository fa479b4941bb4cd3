"""Every failure the server reports, in OpenAI's error shape with the right status.

{"error": {"message": ..., "type": ..., "param": ..., "code": ...}} is what the
official clients parse into BadRequestError, AuthenticationError, and so on.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import EngineNotReadyError, QueueFullError
from engine.errors import EngineDeadError, InvalidRequestError

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying a 503 (queue full, loading, draining).
RETRY_AFTER_SECONDS = 1

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the server raises on purpose, already carrying its status and OpenAI fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def as_api_error(exc: BaseException) -> APIError:
    """Maps the engine's exceptions to HTTP; anything unexpected is a 500 (and a logged bug)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(503, f"server is overloaded: {exc}", code="queue_full")
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc), code="not_ready")
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), code="engine_dead")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error")


def sse_error_event(exc: BaseException) -> str:
    """The error event a stream ends with when it fails after its headers were sent."""
    error = as_api_error(exc)
    return f"data: {json.dumps(error_body(error.status, error.message, error.param, error.code))}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        return error_response(error.status, error.message, error.param, error.code)
