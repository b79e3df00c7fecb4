"""The hot-path requests' bodies, read by hand (orjson) so each failure gets Personalizer's error
code and the common case costs as little as possible, and how a VW failure in the sandbox is
answered. The rules themselves (rank requests, slots, event ids, reward values) are in
service.core.requests, shared with the in-process ranker."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from learners.sandbox import SandboxBusy, SandboxError, SandboxTimeout
from service.api.errors import ApiError, bad_request
from service.core.requests import (
    ID_RULE,
    check_event_id,
    check_feature_count,
    is_id,
    is_reward,
    parse_rank,
    parse_slots,
    rank_error,
)

__all__ = [
    "ID_RULE",
    "check_event_id",
    "check_feature_count",
    "is_id",
    "is_reward",
    "json_body",
    "parse_rank",
    "parse_slots",
    "rank_error",
    "sandbox_error",
]


async def json_body(request: Request, code: str, *, required: bool = True) -> Any:
    body = await request.body()  # at most max_body_bytes: service.api.guard counts them
    if not body.strip():
        if required:
            raise bad_request(code, "request body is required")
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(code, f"request body is not valid JSON: {exc}") from None


def sandbox_error(exc: SandboxError) -> ApiError:
    """How serving answers when VW could not handle a request in its sandbox."""
    if isinstance(exc, SandboxBusy):
        return ApiError(503, "ServiceUnavailable", f"{exc}; retry shortly", retry_after=1)
    if isinstance(exc, SandboxTimeout):
        return rank_error(f"ranking this request {exc}: send fewer features")
    return rank_error(f"features could not be parsed: {exc}")
