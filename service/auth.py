"""API keys: `Ocp-Apim-Subscription-Key` or `Authorization: Bearer`, checked against SHA-256
hashes. Admin keys may do everything on every loop; client keys rank, reward and activate on the
loop they were issued for."""

from __future__ import annotations

from starlette.requests import Request

from service.errors import ApiError
from service.store import hash_key


def presented_key(request: Request) -> str | None:
    key = request.headers.get("ocp-apim-subscription-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def authorize(
    keys: dict[str, tuple[str, str | None]], request: Request, *, loop: str, admin: bool
) -> None:
    key = presented_key(request)
    if not key:
        raise ApiError(
            401, "Unauthorized", "Access denied: missing Ocp-Apim-Subscription-Key header"
        )
    entry = keys.get(hash_key(key))
    if entry is None:
        raise ApiError(401, "Unauthorized", "Access denied: invalid subscription key")
    role, key_loop = entry
    if role == "admin":
        return
    if admin or key_loop != loop:
        raise ApiError(403, "InvalidApiAccess", "This key may not call this operation")
