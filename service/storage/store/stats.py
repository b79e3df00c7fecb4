"""Rollups (learners.rollups: sums per loop, 10 seconds and slot), action counts and model
publications: written as decisions are ingested and joined and as models are published, read
by the stats and holdout endpoints and the dashboard, which never scan raw decisions."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from learners.rollups import FIELDS
from service.storage.models import ActionStat, Joined, LoopStat, ModelPublication
from service.storage.store.common import insert

BUCKET = 10  # seconds: the rollups' resolution
SUMMED = (*FIELDS, "ranked", "late", "dangling", "episodes", "return_sum", "return_sq")

SAMPLE = 2000  # joined rows read for a publication's freshness, at most about
Key = tuple[int, str]  # (bucket, slot)


def bucket_of(t: float) -> int:
    return int(t // BUCKET) * BUCKET


def add_stats(session: Session, *, loop: str, sums: Mapping[Key, Mapping[str, float]]) -> None:
    """Add `sums` (per (bucket, slot), column -> amount) to the loop's rollups: one statement
    per set of columns, rows in key order, so concurrent joiners lock rows in the same order
    (no deadlock)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for bucket, slot in sorted(sums):
        values = {k: v for k, v in sums[bucket, slot].items() if v}
        if values:
            columns = tuple(sorted(values))
            groups.setdefault(columns, []).append(
                {"loop": loop, "bucket": bucket, "slot": slot, **values}
            )
    for columns, rows in groups.items():
        stmt = insert(session, LoopStat)
        stmt = stmt.on_conflict_do_update(
            index_elements=["loop", "bucket", "slot"],
            set_={k: getattr(LoopStat, k) + stmt.excluded[k] for k in columns},
        )
        session.execute(stmt, rows)


def add_actions(session: Session, *, loop: str, counts: Mapping[tuple[int, str, str], int]) -> None:
    """Add served-action counts, per (bucket, slot, action id)."""
    if not counts:
        return
    stmt = insert(session, ActionStat)
    stmt = stmt.on_conflict_do_update(
        index_elements=["loop", "bucket", "slot", "action"],
        set_={"n": ActionStat.n + stmt.excluded.n},
    )
    rows = [
        {"loop": loop, "bucket": b, "slot": s, "action": a, "n": counts[b, s, a]}
        for b, s, a in sorted(counts)
    ]
    session.execute(stmt, rows)


def count_events(session: Session, column: str, times: Mapping[str, Sequence[float]]) -> None:
    """Count events (`ranked`, `late`, `dangling`) per loop in the bucket of each time."""
    for loop, ts in times.items():
        per: dict[Key, dict[str, float]] = {}
        for t in ts:
            key = (bucket_of(t), "")
            per.setdefault(key, {column: 0.0})[column] += 1
        add_stats(session, loop=loop, sums=per)


def mean_reward(session: Session, *, loop: str) -> float:
    """The loop's mean reward over every learnable decision joined so far (0 before any)."""
    n, total = session.execute(
        select(func.sum(LoopStat.reward_n), func.sum(LoopStat.reward_sum)).where(
            LoopStat.loop == loop, LoopStat.slot == ""
        )
    ).one()
    return float(total) / float(n) if n else 0.0


def stat_rows(
    session: Session, *, loop: str, since: float, until: float, size: int
) -> list[dict[str, Any]]:
    """The rollups between `since` and `until` summed into buckets of `size` seconds (a
    multiple of BUCKET), per slot: dicts with `bucket`, `slot` and every summed column."""
    start = LoopStat.bucket - LoopStat.bucket % size
    columns = [func.sum(getattr(LoopStat, c)).label(c) for c in SUMMED]
    stmt = (
        select(start.label("bucket"), LoopStat.slot, *columns)
        .where(LoopStat.loop == loop, LoopStat.bucket >= since, LoopStat.bucket < until)
        .group_by(start, LoopStat.slot)
        .order_by(start, LoopStat.slot)
    )
    return [dict(row._mapping) for row in session.execute(stmt)]


def extent(session: Session, *, loop: str) -> tuple[int, int] | None:
    """The loop's first and last rollup buckets (None before any)."""
    first, last = session.execute(
        select(func.min(LoopStat.bucket), func.max(LoopStat.bucket)).where(LoopStat.loop == loop)
    ).one()
    return None if first is None else (int(first), int(last))


def totals(session: Session, *, loop: str, since: float = 0.0) -> dict[str, float]:
    """Every summed column over the loop's whole decisions (slot "") since `since`."""
    columns = [func.sum(getattr(LoopStat, c)).label(c) for c in SUMMED]
    row = session.execute(
        select(*columns).where(
            LoopStat.loop == loop, LoopStat.slot == "", LoopStat.bucket >= bucket_of(since)
        )
    ).one()
    return {c: float(v or 0.0) for c, v in row._mapping.items()}


def action_rows(
    session: Session, *, loop: str, since: float, until: float, size: int
) -> list[tuple[int, str, str, int]]:
    """Served-action counts summed into buckets of `size` seconds: (bucket, slot, action, n)."""
    start = ActionStat.bucket - ActionStat.bucket % size
    stmt = (
        select(start, ActionStat.slot, ActionStat.action, func.sum(ActionStat.n))
        .where(ActionStat.loop == loop, ActionStat.bucket >= since, ActionStat.bucket < until)
        .group_by(start, ActionStat.slot, ActionStat.action)
        .order_by(start)
    )
    return [(int(b), s, a, int(n)) for b, s, a, n in session.execute(stmt)]


def add_publication(
    session: Session,
    *,
    loop: str,
    model_id: str,
    examples: int,
    now: float,
    stream: str | None = None,
    after: int = 0,
    upto: int = 0,
) -> None:
    """Record a published model. With `stream` ("seq" embedded, "pos" on the Kafka path) its
    freshness over the joined rows it newly includes (positions `after` < p <= `upto`): how long
    after their last reward arrived each was in a published model (now)."""
    lags: list[float] = []
    every = 1
    if stream is not None and upto > after:
        column = Joined.seq if stream == "seq" else Joined.pos
        every = max(1, (upto - after) // SAMPLE)  # a regular sample of at most ~SAMPLE rows
        lags = [
            now - t
            for t in session.scalars(
                select(Joined.observed_at).where(
                    Joined.loop == loop,
                    column > after,
                    column <= upto,
                    column % every == 0,
                    Joined.observed_at.is_not(None),
                )
            )
            if t is not None
        ]
    p50 = p95 = None
    if lags:
        lags.sort()
        p50 = statistics.median(lags)
        p95 = lags[min(len(lags) - 1, int(0.95 * len(lags)))]
    session.add(
        ModelPublication(
            loop=loop,
            model_id=model_id,
            published_at=now,
            examples=examples,
            rewards=len(lags) * every if lags else 0,
            freshness_p50=p50,
            freshness_p95=p95,
        )
    )


def publications(
    session: Session, *, loop: str, since: float, until: float, limit: int = 1000
) -> list[ModelPublication]:
    """The loop's newest publications in [since, until), oldest first."""
    rows = session.scalars(
        select(ModelPublication)
        .where(
            ModelPublication.loop == loop,
            ModelPublication.published_at >= since,
            ModelPublication.published_at < until,
        )
        .order_by(ModelPublication.published_at.desc())
        .limit(limit)
    )
    return list(reversed(list(rows)))
