"""API keys: `Ocp-Apim-Subscription-Key` or `Authorization: Bearer`, checked against SHA-256
hashes, or the dashboard's session cookie (service.api.session), which stands for the key its
holder logged in with. Admin keys may do everything on every loop; client keys rank, reward and
activate on the loop they were issued for; viewer keys may only look (the read-only operations,
on their loop, or on every loop for a viewer key issued without one). A key past its expiry, or
revoked, is refused like an unknown one, and so is a session of it.

A change (any method but GET/HEAD) made with the session cookie must carry the session's CSRF
token in `X-CSRF-Token` (403 otherwise); the cookie is also SameSite=Strict."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping

from starlette.requests import Request

from service.api.errors import ApiError
from service.storage.store import hash_key

ADMIN, CLIENT, VIEWER = "admin", "client", "viewer"
SAFE_METHODS = ("GET", "HEAD")
CSRF_HEADER = "x-csrf-token"

# A session cookie's value -> (key hash, CSRF token), None if it is not a valid session.
SessionReader = Callable[[str], tuple[str, str] | None]


class KeyTable:
    """The keys a process accepts: by hash, (role, loop, expiry or None), with the clock that
    judges expiry, and the reader of dashboard sessions (None: no sessions accepted)."""

    def __init__(
        self,
        entries: Mapping[str, tuple[str, str | None, float | None]] | None = None,
        clock: Callable[[], float] = time.time,
        sessions: SessionReader | None = None,
    ) -> None:
        self.entries = dict(entries or {})
        self.clock = clock
        self.sessions = sessions

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


SESSION_COOKIE = "dloop_session"


def session_of(keys: KeyTable, cookies: Mapping[str, str]) -> tuple[str, str] | None:
    """(key hash, CSRF token) of the valid dashboard session among `cookies`, else None."""
    cookie = cookies.get(SESSION_COOKIE)
    if not cookie or keys.sessions is None:
        return None
    return keys.sessions(cookie)


def check_csrf(request: Request, csrf: str) -> None:
    """403 unless the request carries the session's CSRF token."""
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), csrf.encode()):
        raise ApiError(403, "InvalidApiAccess", "missing or wrong X-CSRF-Token")


def _presented_hash(keys: KeyTable, request: Request) -> str:
    """The hash of the caller's key: from a header, else from the session cookie (checking
    the CSRF token of a change); 401 without either."""
    digest: str | None = request.scope.get("dloop.key_hash")
    if digest is not None:  # hashed from the same header on the way in (service.api.paths)
        return digest
    key = presented_key(request)
    if key:
        return hash_key(key)
    if request.cookies.get(SESSION_COOKIE) and keys.sessions is not None:
        session = session_of(keys, request.cookies)
        if session is None:
            raise ApiError(401, "Unauthorized", "Access denied: the session has expired")
        key_hash, csrf = session
        if request.method not in SAFE_METHODS:
            check_csrf(request, csrf)
        return key_hash
    raise ApiError(401, "Unauthorized", "Access denied: missing Ocp-Apim-Subscription-Key header")


def authorize(
    keys: KeyTable, request: Request, *, loop: str, admin: bool, view: bool = False
) -> str:
    """Check the caller may call this operation on `loop` ("" for a deployment-wide one);
    returns its role. `admin`: only admin keys (and, with `view`, viewer keys) may; else
    client keys of the loop may too. 401 for no or an unknown key, 403 for a key that may not."""
    entry = keys.get(_presented_hash(keys, request))
    if entry is None:
        raise ApiError(401, "Unauthorized", "Access denied: invalid subscription key")
    role, key_loop = entry
    if role == ADMIN:
        return role
    if role == VIEWER:
        if view and (key_loop is None or key_loop == loop):
            return role
    elif not admin and key_loop == loop:
        return role
    raise ApiError(403, "InvalidApiAccess", "This key may not call this operation")
