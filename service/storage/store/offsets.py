"""Named offsets: how far each consumer of a log (the joiner, the publisher) has read."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.storage.models import (
    LogOffset,
)
from service.storage.store.common import insert


def get_offset(session: Session, *, name: str) -> int:
    row = session.get(LogOffset, name)
    return row.offset if row else 0


def stored_offset(session: Session, *, name: str) -> int | None:
    row = session.get(LogOffset, name)
    return row.offset if row else None


def set_offset(session: Session, *, name: str, offset: int) -> None:
    stmt = insert(session, LogOffset).values(name=name, offset=offset)
    session.execute(
        stmt.on_conflict_do_update(index_elements=["name"], set_={"offset": stmt.excluded.offset})
    )
