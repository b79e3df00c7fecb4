"""Rollups (learners.rollups: sums per loop, 10 seconds and slot), action counts and model
publications: written as decisions are ingested and joined and as models are published, read
by the stats and holdout endpoints and the dashboard, which never scan raw decisions."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from learners import rollups
from learners.rollups import FIELDS
from service.storage.models import ActionStat, Joined, LoopStat, ModelPublication
from service.storage.store.common import insert
from service.storage.store.guardrails import compact_outcomes

BUCKET = 10  # seconds: the rollups' resolution
SUMMED = (*FIELDS, "ranked", "late", "dangling", "episodes", "return_sum", "return_sq")

# The bucket of a loop's running totals since its first decision (one row per slot, kept with
# every addition), so whole-history figures (the uplift, the join's centre) read one row.
ALL_TIME = -1
SAMPLE = 2000  # joined rows read for a publication's freshness, at most about
Key = tuple[int, str]  # (bucket, slot)


def bucket_of(t: float) -> int:
    return int(t // BUCKET) * BUCKET


def add_stats(session: Session, *, loop: str, sums: Mapping[Key, Mapping[str, float]]) -> None:
    """Add `sums` (per (bucket, slot), column -> amount) to the loop's rollups: one statement
    per set of columns, rows in key order, so concurrent joiners lock rows in the same order
    (no deadlock)."""
    everything: dict[Key, dict[str, float]] = {}
    for (_, slot), values in sums.items():
        rollups.add(everything.setdefault((ALL_TIME, slot), {}), values)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    merged = {**sums, **everything}
    for bucket, slot in sorted(merged):
        values = {k: v for k, v in merged[bucket, slot].items() if v}
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
    row = session.execute(
        select(LoopStat.reward_n, LoopStat.reward_sum).where(
            LoopStat.loop == loop, LoopStat.slot == "", LoopStat.bucket == ALL_TIME
        )
    ).one_or_none()
    return float(row[1]) / float(row[0]) if row is not None and row[0] else 0.0


def stat_rows(
    session: Session, *, loop: str, since: float, until: float, size: int
) -> list[dict[str, Any]]:
    """The rollups between `since` and `until` summed into buckets of `size` seconds (a
    multiple of BUCKET), per slot: dicts with `bucket`, `slot` and every summed column."""
    start = LoopStat.bucket - LoopStat.bucket % size
    columns = [func.sum(getattr(LoopStat, c)).label(c) for c in SUMMED]
    stmt = (
        select(start.label("bucket"), LoopStat.slot, *columns)
        .where(LoopStat.loop == loop, LoopStat.bucket >= max(0, since), LoopStat.bucket < until)
        .group_by(start, LoopStat.slot)
        .order_by(start, LoopStat.slot)
    )
    return [dict(row._mapping) for row in session.execute(stmt)]


def extent(session: Session, *, loop: str) -> tuple[int, int] | None:
    """The loop's first and last rollup buckets (None before any)."""
    first, last = session.execute(
        select(func.min(LoopStat.bucket), func.max(LoopStat.bucket)).where(
            LoopStat.loop == loop, LoopStat.bucket >= 0
        )
    ).one()
    return None if first is None else (int(first), int(last))


def totals(session: Session, *, loop: str, since: float | None = None) -> dict[str, float]:
    """Every summed column over the loop's whole decisions (slot ""): since `since`, or with
    None since the first (its running totals: one row)."""
    columns = [func.sum(getattr(LoopStat, c)).label(c) for c in SUMMED]
    where = (
        LoopStat.bucket == ALL_TIME
        if since is None
        else LoopStat.bucket >= max(0, bucket_of(since))
    )
    row = session.execute(
        select(*columns).where(LoopStat.loop == loop, LoopStat.slot == "", where)
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


COMPACT_AFTER = 2 * 86400  # seconds: older rollups are kept per hour, not per 10 seconds
HOUR = 3600


def compact(session: Session, *, before: float, limit: int = 2000) -> int:
    """Merge the rollups of every loop older than `before` into hourly buckets (their sums are
    sums: an hour's row adds up its 10-second rows), at most `limit` hours per call; returns how
    many hours were merged. What `stat_rows` answers is unchanged for buckets of an hour or
    more; finer ones are not asked of old data by the dashboard. A join adding to an old bucket
    later just adds a row the next pass merges."""
    cutoff = bucket_of(before) - bucket_of(before) % HOUR
    hour = LoopStat.bucket - LoopStat.bucket % HOUR
    fine = and_(LoopStat.bucket >= 0, LoopStat.bucket < cutoff)
    groups = session.execute(
        select(LoopStat.loop, hour.label("hour"), LoopStat.slot)
        .where(fine)
        .group_by(LoopStat.loop, hour, LoopStat.slot)
        .having(or_(func.count() > 1, func.max(LoopStat.bucket % HOUR) > 0))
        .limit(limit)
    ).all()
    for loop, start, slot in groups:
        rows = and_(
            LoopStat.loop == loop,
            LoopStat.slot == slot,
            LoopStat.bucket >= start,
            LoopStat.bucket < start + HOUR,
        )
        columns = [func.sum(getattr(LoopStat, c)).label(c) for c in SUMMED]
        sums = session.execute(select(*columns).where(rows)).one()._mapping
        session.execute(delete(LoopStat).where(rows))
        session.add(
            LoopStat(loop=loop, bucket=start, slot=slot, **{c: sums[c] or 0 for c in SUMMED})
        )
        actions = and_(
            ActionStat.loop == loop,
            ActionStat.slot == slot,
            ActionStat.bucket >= start,
            ActionStat.bucket < start + HOUR,
        )
        counts = session.execute(
            select(ActionStat.action, func.sum(ActionStat.n))
            .where(actions)
            .group_by(ActionStat.action)
        ).all()
        session.execute(delete(ActionStat).where(actions))
        session.add_all(
            ActionStat(loop=loop, bucket=start, slot=slot, action=a, n=int(n)) for a, n in counts
        )
        if slot == "":
            compact_outcomes(session, loop=loop, start=start, hour=HOUR)
        session.flush()
    return len(groups)
