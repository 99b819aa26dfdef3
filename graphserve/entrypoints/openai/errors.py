"""OpenAI's error body for every failure, and the exception handlers that produce it.

Every client mistake is a 4xx (FastAPI's 422 becomes 400, as in vLLM); only a server fault is a 500. The body is
`{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status (vLLM >= 0.10.1).
"""
from __future__ import annotations

import http
import logging
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from graphserve.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
_LEADING_NAME = re.compile(r"^([a-z_]+)\b")
# How pydantic names the members of a Union in an error's location, e.g. ("prompt", "list[int]", 0).
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\])$")


class OpenAIError(Exception):
    """A failure to answer with OpenAI's error body and the given HTTP status."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param

    @classmethod
    def bad_request(cls, error: Exception, fields: Iterable[str] = ()) -> OpenAIError:
        """A 400 from a ValueError; `param` is the field its message starts with, when that is a request field."""
        message = str(error)
        match = _LEADING_NAME.match(message)
        param = match.group(1) if match and match.group(1) in set(fields) else None
        return cls(message, 400, param)


def error_body(message: str, status_code: int, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error."""
    err_type = _ERROR_TYPES.get(status_code) or http.HTTPStatus(status_code).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=status_code)).model_dump()


def error_response(message: str, status_code: int, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error as a JSON response."""
    return JSONResponse(error_body(message, status_code, param), status_code=status_code, headers=headers)


def format_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's error list as one message, and the first offending field as `param`."""
    parts: list[str] = []
    param = None
    union_types: dict[str, list[str]] = {}  # field -> the types of a Union it matched none of
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"Invalid JSON in the request body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = loc[0] if loc else None
        if param is None and field is not None and not field.isdigit():
            param = field
        if len(loc) > 1 and _UNION_TAG.match(loc[1]):
            union_types.setdefault(field, [])
            if loc[1] not in union_types[field]:
                union_types[field].append(loc[1])
            continue
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        part = f"{'.'.join(loc)}: {msg}" if loc else msg
        if part not in parts:
            parts.append(part)
    for field, types in union_types.items():
        parts.append(f"{field}: Input should be one of {', '.join(types)}")
    if len(parts) > 4:
        parts = parts[:4] + [f"... ({len(parts) - 4} more)"]
    return "Invalid request: " + "; ".join(parts), param


async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = format_validation_errors(list(exc.errors()))
    return error_response(message, 400, param)


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # 404 for unknown paths, 405 for wrong methods, 400 when the body could not be read (e.g. invalid UTF-8).
    message = str(exc.detail)
    if exc.status_code == 400 and message == "There was an error parsing the body":
        message = "Could not read the request body: it must be UTF-8 encoded JSON (within --max-request-size)."
    return error_response(message, exc.status_code, headers=getattr(exc, "headers", None))


async def _openai_error_handler(request: Request, exc: OpenAIError) -> JSONResponse:
    return error_response(exc.message, exc.status_code, exc.param)


async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("internal error while serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(f"Internal server error: {type(exc).__name__}", 500)


def install_exception_handlers(app: FastAPI) -> None:
    """Make every error of `app` answer with OpenAI's body."""
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(Exception, _internal_error_handler)
