"""RL episodes: which are complete, their steps, and unlearning them for a retrain."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session

from service.storage.models import (
    DeadLetter,
    Decision,
    Episode,
    Joined,
)


def complete_episodes(session: Session, *, loop: str, limit: int) -> Sequence[Episode]:
    """Ended episodes not learned yet whose every step is joined, oldest end first."""
    open_step = exists().where(
        Decision.loop == Episode.loop,
        Decision.episode == Episode.episode_id,
        Decision.joined.is_(False),
    )
    stmt = (
        select(Episode)
        .where(Episode.loop == loop, Episode.learned.is_(False), ~open_step)
        .order_by(Episode.ended_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def episode_steps(
    session: Session, *, loop: str, episodes: Sequence[str]
) -> dict[str, list[Joined]]:
    """The joined steps of these episodes, each in the order they were ranked."""
    out: dict[str, list[Joined]] = {e: [] for e in episodes}
    stmt = (
        select(Joined)
        .where(Joined.loop == loop, Joined.episode.in_(list(episodes)))
        .order_by(Joined.created_at, Joined.seq)
    )
    for row in session.scalars(stmt):
        out[row.episode or ""].append(row)
    return out


def learned_episodes(
    session: Session, *, loop: str, offset: int, limit: int, dead: str
) -> Sequence[tuple[str, bool, int]]:
    """The loop's learned episodes, latest end first (from `offset`, at most `limit`): each
    one's id, whether it terminated, and how many joined steps it has; without those a learner
    gave up on (a step in the dead letters from source `dead`)."""
    stmt = (
        select(Episode.episode_id, Episode.terminated, func.count(Joined.seq))
        .join(
            Joined,
            and_(Joined.loop == Episode.loop, Joined.episode == Episode.episode_id),
            isouter=True,
        )
        .join(
            DeadLetter,
            and_(
                DeadLetter.loop == Episode.loop,
                DeadLetter.source == dead,
                DeadLetter.ref == Joined.seq,
            ),
            isouter=True,
        )
        .where(Episode.loop == loop, Episode.learned.is_(True))
        .group_by(Episode.episode_id, Episode.terminated, Episode.ended_at)
        .having(func.count(DeadLetter.id) == 0)
        .order_by(Episode.ended_at.desc(), Episode.episode_id.desc())
        .offset(offset)
        .limit(limit)
    )
    return [(e, bool(t), int(n)) for e, t, n in session.execute(stmt)]


def ended_episodes(session: Session, *, loop: str, since: float | None = None) -> Sequence[Episode]:
    stmt = select(Episode).where(Episode.loop == loop)
    if since is not None:
        stmt = stmt.where(Episode.ended_at >= since)
    return session.scalars(stmt.order_by(Episode.ended_at)).all()


def unlearn_episodes(session: Session, *, loop: str, since: float | None) -> None:
    """Mark a loop's episodes (ended since `since`; None: all) to be learned again."""
    stmt = update(Episode).where(Episode.loop == loop).values(learned=False)
    if since is not None:
        stmt = stmt.where(Episode.ended_at >= since)
    session.execute(stmt)
