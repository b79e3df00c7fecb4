"""API keys: creating, listing and revoking them, and the table every request is checked against."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy.orm import Session

from service.storage.models import (
    ApiKey,
)
from service.storage.store.common import insert


def new_key() -> str:
    return secrets.token_hex(16)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_LOCK = 0x646C6B6579  # "dlkey": the Postgres advisory lock of install_env_key


def install_env_key(session: Session, *, key: str, now: float) -> None:
    """Make `key` (DLOOP_API_KEY) the one environment admin key: stored with source "env" and
    every other env-sourced key deleted; keys made through the API or CLI stay. Replicas
    starting together run this at once: one at a time (a Postgres advisory lock held until
    commit), so replicas started with different keys leave one of them, never a deadlock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(KEYS_LOCK)))
    env = {"role": "admin", "loop": None, "source": "env", "label": None, "expires_at": None}
    stmt = insert(session, ApiKey).values(key_hash=hash_key(key), created_at=now, **env)
    session.execute(stmt.on_conflict_do_update(index_elements=[ApiKey.key_hash], set_=env))
    session.execute(delete(ApiKey).where(ApiKey.source == "env", ApiKey.key_hash != hash_key(key)))


def _valid_admin(now: float) -> Any:
    return and_(ApiKey.role == "admin", or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now))


def has_admin_key(session: Session, *, now: float) -> bool:
    """Whether some admin key is valid (not expired) at `now`."""
    return session.scalar(select(exists().where(_valid_admin(now)))) or False


def key_table(session: Session) -> dict[str, tuple[str, str | None, float | None]]:
    """Every key by hash: (role, loop, expiry or None)."""
    return {k.key_hash: (k.role, k.loop, k.expires_at) for k in session.scalars(select(ApiKey))}


def list_keys(session: Session, *, loop: str | None) -> Sequence[ApiKey]:
    """A loop's client and viewer keys, or with loop None the keys of every loop (admin keys
    and viewer keys of every loop)."""
    where = ApiKey.loop == loop if loop is not None else ApiKey.loop.is_(None)
    return session.scalars(select(ApiKey).where(where).order_by(ApiKey.id)).all()


def create_key(
    session: Session,
    *,
    role: str,
    loop: str | None,
    now: float,
    source: str,
    label: str | None = None,
    expires_at: float | None = None,
) -> tuple[ApiKey, str]:
    """A new random key: the row (hash only) and the key itself, which is not stored."""
    key = new_key()
    row = ApiKey(
        key_hash=hash_key(key),
        role=role,
        loop=loop,
        created_at=now,
        source=source,
        label=label,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, key


def all_keys(session: Session) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).order_by(ApiKey.id)).all()


def get_key(session: Session, *, key_id: int) -> ApiKey | None:
    # Ids are 32-bit (INTEGER in Postgres): anything else names no key (and would overflow).
    if not 0 < key_id < 1 << 31:
        return None
    return session.get(ApiKey, key_id)


class LastAdminKeyError(Exception):
    """Revoking this key would leave no valid admin key."""


def revoke_key(session: Session, *, row: ApiKey, now: float) -> None:
    """Delete a key. Raises LastAdminKeyError rather than delete the last valid admin key
    (nobody could manage the deployment after that)."""
    if row.role == "admin":
        # Locking every valid admin key makes two concurrent revocations of the last two wait
        # for each other: the second then sees only its own key left.
        valid = session.scalars(select(ApiKey.id).where(_valid_admin(now)).with_for_update())
        if list(valid) == [row.id]:
            raise LastAdminKeyError("this is the last valid admin key: create another one first")
    session.delete(row)
    session.flush()
