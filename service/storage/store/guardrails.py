"""Per-outcome rollups (OutcomeStat) and guardrail states: written by the joiner as it joins
(service.pipeline.guardrails checks them), read by serving (is a loop in fallback?), the
guardrails endpoint, /metrics and the dashboard."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session

from learners.guardrails import SUMS
from service.storage.models import GuardrailState, OutcomeStat
from service.storage.store.common import insert

OutcomeKey = tuple[int, str]  # (bucket, outcome)


def add_outcome_stats(
    session: Session, *, loop: str, sums: Mapping[OutcomeKey, Mapping[str, float]]
) -> None:
    """Add per (bucket, outcome) sums (learners.guardrails.SUMS) to the loop's rollups, rows in
    key order (concurrent joiners lock them in the same order)."""
    rows = [
        {"loop": loop, "bucket": b, "outcome": o, **{c: sums[b, o].get(c, 0.0) for c in SUMS}}
        for b, o in sorted(sums)
    ]
    if not rows:
        return
    stmt = insert(session, OutcomeStat)
    stmt = stmt.on_conflict_do_update(
        index_elements=["loop", "bucket", "outcome"],
        set_={c: getattr(OutcomeStat, c) + stmt.excluded[c] for c in SUMS},
    )
    session.execute(stmt, rows)


def outcome_sums(session: Session, *, loop: str, outcome: str, since: float) -> dict[str, float]:
    """An outcome's sums over the decisions made since `since` (by 10-second bucket)."""
    columns = [func.sum(getattr(OutcomeStat, c)).label(c) for c in SUMS]
    row = session.execute(
        select(*columns).where(
            OutcomeStat.loop == loop,
            OutcomeStat.outcome == outcome,
            OutcomeStat.bucket >= since - since % 10,
        )
    ).one()
    return {c: float(row._mapping[c] or 0.0) for c in SUMS}


def outcome_means(
    session: Session, *, loop: str, since: float, until: float, size: int
) -> list[tuple[int, str, float, float]]:
    """Per bucket of `size` seconds and outcome: (bucket, outcome, decisions, mean)."""
    start = OutcomeStat.bucket - OutcomeStat.bucket % size
    stmt = (
        select(start, OutcomeStat.outcome, func.sum(OutcomeStat.n), func.sum(OutcomeStat.y_sum))
        .where(OutcomeStat.loop == loop, OutcomeStat.bucket >= since, OutcomeStat.bucket < until)
        .group_by(start, OutcomeStat.outcome)
        .order_by(start, OutcomeStat.outcome)
    )
    return [
        (int(b), str(o), float(n or 0), float(s or 0) / float(n) if n else 0.0)
        for b, o, n, s in session.execute(stmt)
    ]


def compact_outcomes(session: Session, *, loop: str, start: int, hour: int) -> None:
    """Merge a loop's outcome rollups of one hour into the hour's bucket (store.compact)."""
    rows = and_(
        OutcomeStat.loop == loop, OutcomeStat.bucket >= start, OutcomeStat.bucket < start + hour
    )
    columns = [func.sum(getattr(OutcomeStat, c)).label(c) for c in SUMS]
    merged = session.execute(
        select(OutcomeStat.outcome, *columns).where(rows).group_by(OutcomeStat.outcome)
    ).all()
    session.execute(delete(OutcomeStat).where(rows))
    session.add_all(
        OutcomeStat(loop=loop, bucket=start, outcome=r[0], **{c: r._mapping[c] for c in SUMS})
        for r in merged
    )


def guardrail_states(session: Session, *, loop: str) -> dict[str, GuardrailState]:
    stmt = select(GuardrailState).where(GuardrailState.loop == loop)
    return {g.guardrail: g for g in session.scalars(stmt)}


def all_guardrail_states(session: Session) -> list[GuardrailState]:
    """Every loop's guardrails (for /metrics)."""
    return list(session.scalars(select(GuardrailState).order_by(GuardrailState.loop)))


def start_guardrails(session: Session, *, loop: str, keys: Iterable[str], now: float) -> None:
    """Start watching the loop's new guardrails (their window begins now); the others keep
    their state."""
    known = set(guardrail_states(session, loop=loop))
    for key in keys:
        if key not in known:
            session.add(
                GuardrailState(
                    loop=loop,
                    guardrail=key,
                    state="ok",
                    fallback=False,
                    since=now,
                    changed_at=now,
                    checked_at=0.0,
                )
            )


def drop_guardrail_states(session: Session, *, loop: str, keep: Iterable[str]) -> None:
    """Forget the states of guardrails the loop no longer has."""
    session.execute(
        delete(GuardrailState).where(
            GuardrailState.loop == loop, GuardrailState.guardrail.not_in(list(keep))
        )
    )


def fallback_loops(session: Session, *, names: Iterable[str] | None = None) -> set[str]:
    """The loops a guardrail has put in fallback (serving the holdout policy)."""
    stmt = select(GuardrailState.loop).where(GuardrailState.fallback.is_(True))
    if names is not None:
        stmt = stmt.where(GuardrailState.loop.in_(list(names)))
    return set(session.scalars(stmt))
