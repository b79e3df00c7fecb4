"""The dashboard's sessions: a cookie signed and timestamped (itsdangerous) with a secret of
the deployment (server_secrets, shared by every replica), holding the hash of the key its holder
logged in with and the session's CSRF token. Nothing is kept on the server: a session ends when
it expires, when the browser drops the cookie (logout), or when its key is revoked or expires
(service.api.auth checks the key on every request)."""

from __future__ import annotations

import secrets

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_SECONDS = 12 * 3600
SECRET_NAME = "ui-sessions"


class UISessions:
    def __init__(self, secret: bytes, *, max_age: int = SESSION_SECONDS) -> None:
        self._codec = URLSafeTimedSerializer(secret, salt="dloop-ui-session")
        self.max_age = max_age

    def issue(self, key_hash: str) -> tuple[str, str]:
        """A new session of the key: (cookie value, CSRF token)."""
        csrf = secrets.token_urlsafe(24)
        return self._codec.dumps({"h": key_hash, "c": csrf}), csrf

    def read(self, cookie: str) -> tuple[str, str] | None:
        """(key hash, CSRF token) of a valid, unexpired session cookie, else None."""
        try:
            doc = self._codec.loads(cookie, max_age=self.max_age)
        except BadSignature:  # also SignatureExpired
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("h"), str):
            return None
        if not isinstance(doc.get("c"), str):
            return None
        return doc["h"], doc["c"]
