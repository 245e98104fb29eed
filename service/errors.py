"""Typed errors, each with its HTTP status; one handler turns them into OpenAI-style bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Send

from service.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("onejump.service")


class ServiceError(Exception):
    status = 500
    kind = "internal_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class BadRequestError(ServiceError):
    status, kind = 400, "invalid_request_error"


class UnauthorizedError(ServiceError):
    status, kind = 401, "authentication_error"


class ModelNotFoundError(ServiceError):
    status, kind = 404, "not_found_error"


class OverloadedError(ServiceError):
    status, kind = 429, "rate_limit_error"


class NotReadyError(ServiceError):
    status, kind = 503, "service_unavailable"


class QueueTimeoutError(ServiceError):
    status, kind = 504, "timeout"


class ClientGoneError(ServiceError):
    """The client went away (its work was stopped): nobody reads this answer (nginx's 499)."""

    status, kind = 499, "client_closed_request"


# what Starlette's own errors (unknown route, wrong method, unreadable body) become
_HTTP_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_HTTP_MESSAGES = {"There was an error parsing the body": "the request body could not be read as JSON (it must be "
                  "UTF-8 JSON, nested at most a few hundred levels)"}


def error_response(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


async def send_error(send: Send, status: int, kind: str, message: str) -> None:
    """The same body from a plain ASGI middleware (auth, body size), before any route runs."""
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, code=status)).model_dump_json().encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "tagged-union", "union"}


def _is_tag(part: object) -> bool:
    """A step of pydantic's error location that names a union member (``str``, ``list[int]``,
    ``function-after[check_text(), str]``), not a field or an index."""
    return isinstance(part, str) and (part in _TYPE_TAGS or any(c in part for c in "[]()-,"))


def _most_telling(errors: list[dict]) -> dict:
    """Of the errors pydantic lists (one per union member when a value fits none), the one that says most:
    a check's own message (value_error), then a broken limit (too_long, greater_than, ...) before a type
    mismatch (string_type, ...), then the deepest location (the member the value was meant for got furthest)."""
    if not errors:
        return {}

    def rank(e: dict) -> tuple[bool, bool, int, int]:
        kind = str(e.get("type", ""))
        return kind == "value_error", not kind.endswith("_type"), len(e.get("loc", ())), -errors.index(e)

    return max(errors, key=rank)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = _most_telling(list(exc.errors()))
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_tag(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param or 'body'}: {msg}", param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500 and exc.status != 499:
            log.warning("%s: %s", exc.kind, exc.message)
        return error_response(exc.status, exc.kind, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, "invalid_request_error", message, param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "invalid_request_error")
        message = _HTTP_MESSAGES.get(str(exc.detail), str(exc.detail))
        response = error_response(exc.status_code, kind, message)
        response.headers.update(exc.headers or {})  # 405 keeps its Allow header
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal_error", "internal server error; see the server log")
