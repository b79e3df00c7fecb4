"""Joined interactions: what learners and offline jobs read, dead letters, retention, export."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from learners.features import FeatureError, clean_line
from service.storage.models import (
    DeadLetter,
    Decision,
    Episode,
    Joined,
    Observation,
)


def dead_letter(
    session: Session,
    *,
    source: str,
    loop: str,
    ref: int | None,
    record: str,
    reason: str,
    now: float,
) -> None:
    """Keep a record dloop could not use, with why: an interaction a learner could not learn
    (`ref` its position in the joined stream: no learner tries it again), or a record an
    in-process ranker shipped that the server refused (no `ref`)."""
    session.add(
        DeadLetter(
            source=source,
            loop=loop,
            ref=ref,
            record=storable(record),
            reason=storable(reason[:512]),
            created_at=now,
        )
    )


def storable(text: str) -> str:
    """`text` as a dead letter can hold it: NUL (which Postgres refuses in text) as U+FFFD,
    as a decode with errors="replace" marks bytes it cannot read. A dead letter is what could
    not be read, and refused it would fail its whole batch, again on every retry."""
    return text.replace("\x00", "\ufffd")


def poisoned(session: Session, *, source: str, loop: str, after: int) -> set[int]:
    """Positions past `after` in the loop's joined stream that a learner dead-lettered."""
    stmt = select(DeadLetter.ref).where(
        DeadLetter.loop == loop, DeadLetter.source == source, DeadLetter.ref > after
    )
    return {ref for ref in session.scalars(stmt) if ref is not None}


def trainable(row: Joined) -> bool:
    """Whether a joined interaction trains the model: activated (or not deferred) and not
    logged in LoggingOnly mode."""
    return row.learnable and row.mode != "LoggingOnly"


def joined_after(session: Session, *, loop: str, seq: int, limit: int) -> Sequence[Joined]:
    stmt = select(Joined).where(Joined.loop == loop, Joined.seq > seq).order_by(Joined.seq)
    return session.scalars(stmt.limit(limit)).all()


def joined_between(
    session: Session, *, loop: str, since: float, until_seq: int, after_seq: int = 0
) -> Sequence[Joined]:
    stmt = select(Joined).where(
        Joined.loop == loop,
        Joined.created_at >= since,
        Joined.seq > after_seq,
        Joined.seq <= until_seq,
    )
    return session.scalars(stmt.order_by(Joined.seq)).all()


def max_seq(session: Session, *, loop: str) -> int:
    return session.scalar(select(func.max(Joined.seq)).where(Joined.loop == loop)) or 0


def event(
    session: Session, *, loop: str, event_id: str
) -> tuple[Decision, Joined | None, Sequence[Observation]] | None:
    decision = session.get(Decision, (loop, event_id))
    if decision is None:
        return None
    joined = session.scalars(
        select(Joined).where(Joined.loop == loop, Joined.event_id == event_id)
    ).first()
    observations = session.scalars(
        select(Observation)
        .where(Observation.loop == loop, Observation.event_id == event_id)
        .order_by(Observation.received_at)
    ).all()
    return decision, joined, observations


def apply_retention(session: Session, *, loops: Sequence[str], before: float) -> None:
    """Delete these loops' logged events created (or received) before `before`."""
    for i in range(0, len(loops), 500):
        chunk = list(loops[i : i + 500])
        session.execute(
            delete(Decision).where(Decision.loop.in_(chunk), Decision.created_at < before)
        )
        session.execute(delete(Joined).where(Joined.loop.in_(chunk), Joined.created_at < before))
        session.execute(
            delete(Observation).where(Observation.loop.in_(chunk), Observation.received_at < before)
        )
        session.execute(delete(Episode).where(Episode.loop.in_(chunk), Episode.ended_at < before))


def log_range(session: Session, *, loop: str) -> tuple[float, float] | None:
    lo, hi = session.execute(
        select(func.min(Decision.created_at), func.max(Decision.created_at)).where(
            Decision.loop == loop
        )
    ).one()
    return None if lo is None else (lo, hi)


def delete_logs(session: Session, *, loop: str) -> None:
    for table in (Decision, Observation, Joined, Episode):
        session.execute(delete(table).where(table.loop == loop))


def export_lines(
    session: Session, *, loop: str, since: float | None = None, until: float | None = None
) -> Iterator[str]:
    """The loop's joined DSJSON lines in join order, for offline tools (export, replay,
    evaluation). Rows written before features were cleaned at ingestion are cleaned here, and
    a line that cannot be is left out."""
    stmt = select(Joined.line).where(Joined.loop == loop)
    if since is not None:
        stmt = stmt.where(Joined.created_at >= since)
    if until is not None:
        stmt = stmt.where(Joined.created_at < until)
    for line in session.scalars(stmt.order_by(Joined.seq).execution_options(yield_per=1000)):
        try:
            yield clean_line(line)
        except FeatureError:
            continue
