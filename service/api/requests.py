"""The hot-path requests' bodies, read by hand (orjson) so each failure gets Personalizer's error
code and the common case costs as little as possible, and how a VW failure in the sandbox is
answered. The rules themselves (rank requests, slots, event ids, reward values) are in
service.core.requests, shared with the in-process ranker."""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect, Request

from learners.sandbox import SandboxBusy, SandboxError, SandboxTimeout
from service.api.errors import ApiError
from service.core.requests import (
    ID_RULE,
    check_event_id,
    is_id,
    is_reward,
    load_json,
    rank_error,
)

__all__ = [
    "ID_RULE",
    "check_event_id",
    "is_id",
    "is_reward",
    "json_body",
    "rank_error",
    "sandbox_error",
]


async def read_body(request: Request) -> bytes:
    """The request's body: Request.body without its stream generator (a rank's body comes in
    one message), and kept where Request.body keeps it for a later reader."""
    if hasattr(request, "_body"):
        return await request.body()
    chunks: list[bytes] = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body
    return body


async def json_body(request: Request, code: str, *, required: bool = True) -> Any:
    body = await read_body(request)  # at most max_body_bytes: service.api.guard counts them
    return load_json(body, code, required=required)


def sandbox_error(exc: SandboxError) -> ApiError:
    """How serving answers when VW could not handle a request in its sandbox."""
    if isinstance(exc, SandboxBusy):
        return ApiError(503, "ServiceUnavailable", f"{exc}; retry shortly", retry_after=1)
    if isinstance(exc, SandboxTimeout):
        return rank_error(f"ranking this request {exc}: send fewer features")
    return rank_error(f"features could not be parsed: {exc}")
