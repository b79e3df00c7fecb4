"""The reward join's storage: decisions due to be joined, their observations, orphans turned
dangling, joined rows added (service.pipeline.join runs the join; learners.joiner has its rules)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session

from learners.joiner import BACKWARD_WINDOW
from service.storage.models import (
    Decision,
    Joined,
    LogOffset,
    ModelCheckpoint,
    Observation,
)
from service.storage.store.common import dropped_name, insert
from service.storage.store.stats import count_events

MAX_DANGLING = 10_000


def drop_dangling(session: Session, *, loop: str, keep: int) -> int:
    """Delete a loop's oldest dangling observations beyond the newest `keep` (rewards for
    eventIds that never got a decision would otherwise pile up without limit); returns how
    many, also added to the loop's `observations_dropped` count in loop_counts."""
    # Ids follow ingestion order, which is arrival order up to the spread between partitions.
    newest_dropped = session.scalar(
        select(Observation.id)
        .where(Observation.loop == loop, Observation.status == "dangling")
        .order_by(Observation.id.desc())
        .offset(keep)
        .limit(1)
    )
    if newest_dropped is None:
        return 0
    result = session.execute(
        delete(Observation).where(
            Observation.loop == loop,
            Observation.status == "dangling",
            Observation.id <= newest_dropped,
        )
    )
    n = int(result.rowcount)  # type: ignore[attr-defined]
    stmt = insert(session, LogOffset).values(name=dropped_name(loop), offset=n)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"], set_={"offset": LogOffset.offset + stmt.excluded.offset}
        )
    )
    return n


def mark_dangling(session: Session, *, loop: str, now: float, keep: int) -> None:
    """Orphan observations whose decision can no longer arrive turn dangling; at most `keep`
    dangling ones are kept (drop_dangling)."""
    marked = session.execute(
        update(Observation)
        .where(
            Observation.loop == loop,
            Observation.status == "pending",
            Observation.received_at < now - BACKWARD_WINDOW,
            ~exists().where(
                Decision.loop == Observation.loop, Decision.event_id == Observation.event_id
            ),
        )
        .values(status="dangling")
        .returning(Observation.received_at)
    )
    times = list(marked.scalars())
    if times:
        count_events(session, "dangling", {loop: times})
        drop_dangling(session, loop=loop, keep=keep)


def decisions_to_join(
    session: Session, *, loop: str, wait: float, now: float, limit: int, earliest: bool
) -> list[Decision]:
    """Up to `limit` unjoined decisions whose window closed, locked for this transaction;
    with `earliest` (the aggregation), also open ones that have a pending reward (complete
    early, perhaps). Several joiners may run at once (Kafka path): each takes rows the others
    have not locked."""
    closed = select(Decision).where(
        Decision.loop == loop, Decision.joined.is_(False), Decision.created_at <= now - wait
    )
    candidates = list(
        session.scalars(
            closed.order_by(Decision.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True, of=Decision)
        )
    )
    if earliest and len(candidates) < limit:
        # Driven from the (few) pending rewards, not the (many) open decisions: found by key
        # from the rewards (any condition on the decisions' own columns, joined or created_at,
        # let SQLite walk every open decision instead: they are checked here, in Python), then
        # taken in time order, ties in the order their rewards came (an RL episode's steps
        # ranked within one clock tick are learned in the order they were played).
        pending = (
            Observation.loop == loop,
            Observation.status == "pending",
            Observation.kind == "reward",
        )
        first = dict(
            session.execute(
                select(Observation.event_id, func.min(Observation.id))
                .where(*pending)
                .group_by(Observation.event_id)
            ).all()
        )
        if first:
            rewarded = select(Observation.event_id).where(*pending)
            found = session.scalars(
                select(Decision)
                .where(Decision.loop == loop, Decision.event_id.in_(rewarded))
                .with_for_update(skip_locked=True, of=Decision)
            )
            early = [d for d in found if not d.joined and d.created_at > now - wait]
            early.sort(key=lambda d: (d.created_at, first.get(d.event_id, math.inf)))
            candidates += early[: limit - len(candidates)]
    return candidates


def observations_of(
    session: Session, *, loop: str, event_ids: Iterable[str]
) -> dict[str, list[Observation]]:
    """The observations of each of `event_ids` (an empty list for one without any)."""
    by_event: dict[str, list[Observation]] = {e: [] for e in event_ids}
    stmt = select(Observation).where(
        Observation.loop == loop, Observation.event_id.in_(list(by_event))
    )
    for o in session.scalars(stmt):
        by_event[o.event_id].append(o)
    return by_event


def mark_joined(
    session: Session, *, loop: str, event_ids: Sequence[str], statuses: dict[int, str]
) -> None:
    """Mark decisions joined and their observations joined or late (by id), in a statement
    per kind of mark: the ORM's unit of work, flushing an update per object, cost a tenth of
    the embedded learner's time."""
    conn = session.connection()  # core execution: no ORM synchronisation of loaded objects
    if event_ids:
        conn.execute(
            update(Decision)
            .where(Decision.loop == loop, Decision.event_id.in_(event_ids))
            .values(joined=True)
        )
    for status in sorted(set(statuses.values())):
        ids = [i for i, s in statuses.items() if s == status]
        conn.execute(update(Observation).where(Observation.id.in_(ids)).values(status=status))


def add_joined(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert joined interactions (one per decision: a second insert of one is ignored), as
    a core insert (the ORM's bulk path costs more per row)."""
    if rows:
        session.connection().execute(
            insert(session, Joined.__table__).on_conflict_do_nothing(), rows
        )


def next_join_at(session: Session, *, loop: str, wait: float) -> tuple[float | None, bool]:
    """When `join_due` will next have work in this loop (None: nothing is pending): the end of
    its oldest open decision's window, or when its oldest pending observation turns dangling;
    and whether it has pending observations (a decision that arrives may complete one's
    event). A reward that completes a decision early arrives through ingestion, which looks
    at once."""
    oldest = session.scalar(
        select(func.min(Decision.created_at)).where(
            Decision.loop == loop, Decision.joined.is_(False)
        )
    )
    orphan = session.scalar(
        select(func.min(Observation.received_at)).where(
            Observation.loop == loop, Observation.status == "pending"
        )
    )
    times = [t + w for t, w in ((oldest, wait), (orphan, BACKWARD_WINDOW)) if t is not None]
    return min(times, default=None), orphan is not None


def loops_with_pending(session: Session) -> set[str]:
    """Loops with open decisions or pending observations (the worker's start-up view)."""
    open_ = select(Decision.loop).where(Decision.joined.is_(False)).distinct()
    pending = select(Observation.loop).where(Observation.status == "pending").distinct()
    return set(session.scalars(open_)) | set(session.scalars(pending))


def loops_to_learn(session: Session) -> set[str]:
    """Loops with joined rows their model does not include yet (the worker's start-up view)."""
    newest = select(Joined.loop, func.max(Joined.seq)).group_by(Joined.loop)
    learned = dict(session.execute(select(ModelCheckpoint.loop, ModelCheckpoint.position)).all())
    return {loop for loop, seq in session.execute(newest).all() if seq > learned.get(loop, 0)}
