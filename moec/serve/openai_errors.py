"""Errors of the OpenAI-compatible routes in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The status codes are the server's own rules: 400 a request moec cannot serve (a prompt longer
than the window, a token id past the vocabulary), 404 an unknown model or route, 413 a body
over :data:`MAX_BODY_BYTES`, 422 a malformed body (pydantic's message, naming the field), 503 a
full queue. ``POST /generate`` keeps FastAPI's ``{"detail": ...}``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
MAX_BODY_BYTES = 8 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "not_found_error" if status == 404 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PATHS)


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """(every problem as "field: message", joined; the first problem's top-level field)."""
    parts, param = [], None
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"] if part != "body"]
        message = problem["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
        if param is None and problem["loc"][1:2] and isinstance(problem["loc"][1], str):
            param = problem["loc"][1]
    return "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        if not _openai(request):
            return await request_validation_exception_handler(request, err)
        message, param = validation_message(err)
        return error_response(422, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if not _openai(request):
            return await http_exception_handler(request, err)
        return error_response(err.status_code, str(err.detail), None, "not_found" if err.status_code == 404 else None)

    app.add_middleware(BodyLimit)


class BodyLimit:
    """A 413 before the body is read when its Content-Length passes MAX_BODY_BYTES (plain ASGI: streams untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(OPENAI_PATHS):
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                reply = error_response(413, f"the request body has {int(length)} bytes; at most {MAX_BODY_BYTES}",
                                       None, "body_too_large")
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)
