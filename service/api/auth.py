"""API keys: `Ocp-Apim-Subscription-Key` or `Authorization: Bearer`, checked against SHA-256
hashes. Admin keys may do everything on every loop; client keys rank, reward and activate on the
loop they were issued for. A key past its expiry is refused like an unknown one."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from starlette.requests import Request

from service.api.errors import ApiError
from service.storage.store import hash_key


class KeyTable:
    """The keys a process accepts: by hash, (role, loop, expiry or None), with the clock that
    judges expiry."""

    def __init__(
        self,
        entries: Mapping[str, tuple[str, str | None, float | None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.entries = dict(entries or {})
        self.clock = clock

    def get(self, key_hash: str) -> tuple[str, str | None] | None:
        """(role, loop) of a key that is valid now, else None."""
        entry = self.entries.get(key_hash)
        if entry is None:
            return None
        role, loop, expires_at = entry
        if expires_at is not None and expires_at <= self.clock():
            return None
        return role, loop


def presented_key(request: Request) -> str | None:
    key = request.headers.get("ocp-apim-subscription-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def authorize(keys: KeyTable, request: Request, *, loop: str, admin: bool) -> None:
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
