"""Errors and their Personalizer-shaped responses.

ApiError(status, code, message)      -> {"error": {"code", "message"}} + x-ms-error-code
  every 4xx the API raises is an ApiError with Personalizer's error code;
RequestValidationError / HTTPException from the framework are mapped to the same body;
anything else is a 500 InternalServerError (and a bug).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.core.errors import ApiError, bad_request

log = logging.getLogger("dloop")


__all__ = ["ApiError", "bad_request", "error_response", "install", "respond"]


def respond(exc: ApiError) -> Response:
    """The response for an ApiError (service.core.errors)."""
    response = error_response(exc.status, exc.code, exc.message)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def error_response(status: int, code: str, message: str) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    # nosniff here too: the framework's 500 handler answers outside every middleware.
    headers = {"x-ms-error-code": code, "x-content-type-options": "nosniff"}
    return Response(body, status_code=status, media_type="application/json", headers=headers)


_HTTP_CODES = {
    401: "Unauthorized",
    403: "InvalidApiAccess",
    408: "RequestTimeout",
    429: "TooManyRequests",
    404: "ResourceNotFound",
    405: "MethodNotAllowed",
    413: "PayloadSizeExceeded",
}


def http_error_response(exc: HTTPException) -> Response:
    """The Personalizer body for the framework's (and service.api.guard's) HTTP errors."""
    code = _HTTP_CODES.get(exc.status_code, "BadRequest")
    return error_response(exc.status_code, code, str(exc.detail))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> Response:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, "BadRequest", f"{where}: {first['msg']}".lstrip(": "))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> Response:
        return http_error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "InternalServerError", "internal error")
