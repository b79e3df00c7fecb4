"""The Kafka path's outbox: joined rows get stream positions and are published in order."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.storage.models import (
    Joined,
)

OUTBOX_LOCK = 0x646C6F6F70  # "dloop": the Postgres advisory lock of the position assigner


def assign_positions(session: Session, *, limit: int) -> int:
    """Give unpublished joined rows gap-free per-loop positions, in seq order. One assigner at
    a time (a Postgres advisory lock held until commit); returns how many got one."""
    if session.get_bind().dialect.name == "postgresql":
        got = session.scalar(select(func.pg_try_advisory_xact_lock(OUTBOX_LOCK)))
        if not got:
            return 0
    rows = session.scalars(
        select(Joined)
        .where(Joined.published.is_(False), Joined.pos.is_(None))
        .order_by(Joined.seq)
        .limit(limit)
    ).all()
    last: dict[str, int] = {}
    for row in rows:
        if row.loop not in last:
            last[row.loop] = max_pos(session, loop=row.loop)
        last[row.loop] += 1
        row.pos = last[row.loop]
    return len(rows)


def unpublished(session: Session, *, limit: int) -> Sequence[Joined]:
    stmt = (
        select(Joined)
        .where(Joined.published.is_(False), Joined.pos.is_not(None))
        .order_by(Joined.loop, Joined.pos)
    )
    return session.scalars(stmt.limit(limit)).all()


def mark_published(session: Session, *, seqs: Sequence[int]) -> None:
    session.execute(update(Joined).where(Joined.seq.in_(list(seqs))).values(published=True))


def max_pos(session: Session, *, loop: str) -> int:
    """The newest position assigned in a loop's joined stream (0: none yet)."""
    return session.scalar(select(func.max(Joined.pos)).where(Joined.loop == loop)) or 0


def joined_by_pos(
    session: Session, *, loop: str, after: int, until: int, since: float | None = None
) -> Sequence[Joined]:
    """A loop's joined rows with stream positions in (after, until], created since `since`."""
    stmt = select(Joined).where(Joined.loop == loop, Joined.pos > after, Joined.pos <= until)
    if since is not None:
        stmt = stmt.where(Joined.created_at >= since)
    return session.scalars(stmt.order_by(Joined.pos)).all()
