"""Ingestion: decision-log records into decisions, observations and episode ends."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from learners.features import clean_context
from service.core import record
from service.core.record import RecordError
from service.storage.models import (
    DeadLetter,
    Decision,
    Episode,
    Observation,
)
from service.storage.store.common import insert
from service.storage.store.joined import storable
from service.storage.store.stats import count_events


@dataclass
class Ingested:
    dead: int  # records that went to the dead letters
    observed: set[str]  # loops that got observations or episode ends
    first_decision: dict[str, float]  # loops that got decisions: the oldest one's time

    @property
    def loops(self) -> set[str]:
        """Loops that got decisions, observations or episode ends."""
        return self.observed | set(self.first_decision)


@dataclass
class _Rows:
    decisions: list[dict[str, Any]] = field(default_factory=list)
    observations: list[dict[str, Any]] = field(default_factory=list)
    ends: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)


def ingest(session: Session, *, records: Iterable[bytes], source: str, now: float) -> Ingested:
    """Store decision and observation records. The first decision for an eventId wins.

    An observation for an event that is already joined is stored as late. A record that cannot
    be read goes to the dead-letter table.
    """
    rows = _Rows()
    for raw in records:
        try:
            r, raw = _read(raw)
        except (RecordError, TypeError, ValueError, RecursionError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            rows.dead.append(_dead(source, None, raw.decode(errors="replace"), why, now))
            continue
        _add(rows, r, raw)
    _late_steps(session, rows, source, now)
    _insert_rows(session, rows)
    observed = {str(r["loop"]) for r in (*rows.observations, *rows.ends)}
    first: dict[str, float] = {}
    for row in rows.decisions:
        loop, t = str(row["loop"]), float(row["created_at"])
        first[loop] = min(first.get(loop, t), t)
    return Ingested(len(rows.dead), observed, first)


def _dead(source: str, loop: str | None, text: str, why: str, now: float) -> dict[str, Any]:
    """A dead-letter row (as store.dead_letter keeps one: storable, the reason cut short)."""
    return {
        "source": source,
        "loop": loop,
        "record": storable(text),
        "reason": storable(why[:512]),
        "created_at": now,
    }


def _read(raw: bytes) -> tuple[record.Record, bytes]:
    """The record and the bytes to store for it: without keys no reader reads
    (record.decode_kept) and a decision's features cleaned of what VW must never see
    (learners.features), since the log may hold records from an older version or another
    producer on the events topic."""
    r, raw = record.decode_kept(raw)
    if isinstance(r, record.Decision | record.SlotsDecision):
        c = orjson.loads(r.c)
        cleaned = clean_context(c, r.c)
        if cleaned is not c:
            r = replace(r, c=orjson.dumps(cleaned).decode())
            raw = record.encode(r)
    return r, raw


def _add(rows: _Rows, r: record.Record, raw: bytes) -> None:
    if isinstance(r, record.Decision | record.SlotsDecision):
        rows.decisions.append(
            {
                "loop": r.loop,
                "event_id": r.id,
                "created_at": r.t,
                "deferred": r.deferred,
                "mode": r.mode,
                "record": raw.decode(),
                "joined": False,
                "episode": r.ep if isinstance(r, record.Decision) else None,
            }
        )
    elif isinstance(r, record.EpisodeEnd):
        rows.ends.append(
            {
                "loop": r.loop,
                "episode_id": r.id,
                "ended_at": r.t,
                "terminated": r.term,
                "learned": False,
                "counted": False,
            }
        )
    else:
        rows.observations.append(
            {
                "loop": r.loop,
                "event_id": r.id,
                "kind": r.kind,
                "value": r.v,
                "received_at": r.t,
                "status": "pending",
                "uid": r.u,
                "slot": r.slot,
                "name": r.n,
            }
        )


def _late_steps(session: Session, rows: _Rows, source: str, now: float) -> None:
    """RL steps ranked after their episode ended (by their times: on the Kafka path a step and
    its episode's end may reach ingestion in either order) go to the dead letters, with why:
    an episode is learned once, when it ends, so a step after its end would be joined and
    never learned. A repeat of a step already stored is left to be dropped as any repeated
    decision is."""
    steps: dict[str, dict[str, list[int]]] = {}  # loop -> episode -> decision indexes
    for i, row in enumerate(rows.decisions):
        if row["episode"] is not None:
            steps.setdefault(row["loop"], {}).setdefault(row["episode"], []).append(i)
    if not steps:
        return
    ended = {(e["loop"], e["episode_id"]): e["ended_at"] for e in reversed(rows.ends)}
    for loop, episodes in steps.items():
        stored = select(Episode.episode_id, Episode.ended_at).where(
            Episode.loop == loop, Episode.episode_id.in_(list(episodes))
        )
        for episode, at in session.execute(stored):
            ended[(loop, episode)] = at  # (the first end counts)
    late = {
        i
        for loop, episodes in steps.items()
        for episode, indexes in episodes.items()
        if (loop, episode) in ended
        for i in indexes
        if rows.decisions[i]["created_at"] > ended[(loop, episode)]
    }
    if not late:
        return
    ids: dict[str, list[str]] = {}
    for i in late:
        ids.setdefault(rows.decisions[i]["loop"], []).append(rows.decisions[i]["event_id"])
    repeats = {
        (loop, event_id)
        for loop, events in ids.items()
        for event_id in session.scalars(
            select(Decision.event_id).where(Decision.loop == loop, Decision.event_id.in_(events))
        )
    }
    kept = []
    for i, row in enumerate(rows.decisions):
        if i not in late:
            kept.append(row)
        elif (row["loop"], row["event_id"]) not in repeats:
            why = (
                f"a step of episode '{row['episode']}' ranked after the episode ended (an "
                "episode is learned once, when it ends)"
            )
            rows.dead.append(_dead(source, row["loop"], row["record"], why, now))
    rows.decisions = kept


def _insert_rows(session: Session, rows: _Rows) -> None:
    # Core inserts (the table, not the mapped class): the ORM bulk path costs more per row.
    conn = session.connection()
    if rows.dead:
        conn.execute(insert(session, DeadLetter.__table__), rows.dead)
    if rows.decisions:
        # Counted once each (a record delivered twice is stored, and counted, once).
        stmt = insert(session, Decision.__table__).on_conflict_do_nothing()
        new = conn.execute(
            stmt.returning(Decision.__table__.c.loop, Decision.__table__.c.created_at),
            rows.decisions,
        )
        count_events(session, "ranked", _by_loop(new))
    if rows.ends:
        conn.execute(insert(session, Episode.__table__).on_conflict_do_nothing(), rows.ends)
    if rows.observations:
        stmt = insert(session, Observation.__table__).on_conflict_do_nothing()
        conn.execute(stmt, rows.observations)
        late = exists().where(
            Decision.loop == Observation.loop,
            Decision.event_id == Observation.event_id,
            Decision.joined.is_(True),
        )
        marked = session.execute(
            update(Observation)
            .where(Observation.status == "pending", late)
            .values(status="late")
            .returning(Observation.loop, Observation.received_at)
        )
        count_events(session, "late", _by_loop(marked))


def _by_loop(rows: Iterable[Any]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for loop, t in rows:
        out.setdefault(loop, []).append(t)
    return out
