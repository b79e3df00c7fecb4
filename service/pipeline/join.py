"""The reward join, run by the embedded worker and the Kafka path's joiner alike: decisions
whose window closed (or that are complete early) are joined with their observations under the
loop's rules (learners.joiner) and become joined interactions learners train on."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from learners.joiner import DecisionView, JoinRules, Obs, SlotDecision, in_window, is_complete, join
from service.core import record
from service.storage import store
from service.storage.models import Decision, Observation


def join_due(
    session: Session,
    *,
    loop: str,
    rules: JoinRules,
    now: float,
    limit: int,
    max_dangling: int = store.MAX_DANGLING,
) -> int:
    """Join decisions whose window closed, or that are complete early; returns how many.
    Keeps at most `max_dangling` dangling observations in the loop (store.drop_dangling)."""
    store.mark_dangling(session, loop=loop, now=now, keep=max_dangling)
    candidates = store.decisions_to_join(
        session,
        loop=loop,
        wait=rules.wait,
        now=now,
        limit=limit,
        earliest=rules.aggregation == "earliest",
    )
    if not candidates:
        return 0
    by_event = store.observations_of(session, loop=loop, event_ids=[d.event_id for d in candidates])
    rows = [
        row
        for d in candidates
        if (row := _join_one(d, by_event[d.event_id], rules, loop=loop, now=now)) is not None
    ]
    store.add_joined(session, rows)
    return len(rows)


def _join_one(
    d: Decision, observations: list[Observation], rules: JoinRules, *, loop: str, now: float
) -> dict[str, Any] | None:
    """The joined row of decision `d`, marking it and its observations; None if its window is
    still open and it is not complete yet."""
    view = view_of(d)
    obs = [Obs(o.kind, o.value, o.received_at, o.slot) for o in observations]
    if d.created_at > now - rules.wait and not is_complete(view, obs, rules):
        return None
    result = join(view, obs, rules)
    d.joined = True
    for o in observations:
        o.status = "joined" if in_window(d.created_at, o.received_at, rules.wait) else "late"
    return {
        "loop": loop,
        "event_id": d.event_id,
        "created_at": d.created_at,
        "joined_at": now,
        "mode": d.mode,
        "learnable": result.learnable,
        "reward": result.reward,
        "rewarded": result.rewarded,
        "imitated": result.imitated,
        "line": result.line.decode(),
        "published": False,
        "episode": d.episode,
    }


def view_of(d: Decision) -> DecisionView:
    """What the join rules need of a stored decision."""
    r = record.decode(d.record)
    slots: list[SlotDecision] = []
    if isinstance(r, record.SlotsDecision):
        # Multi-slot: the first slot stands for the decision where one is needed.
        slots = [SlotDecision(s.id, s.a, s.p, b) for s, b in zip(r.s, r.b, strict=True)]
        ranking, probabilities, baseline = slots[0].ranking, slots[0].probabilities, r.b[0]
    elif isinstance(r, record.Decision):
        ranking, probabilities, baseline = r.a, r.p, r.b
    else:
        raise record.RecordError(f"decision {d.event_id} holds a record of another kind")
    return DecisionView(
        event_id=d.event_id,
        created_at=d.created_at,
        deferred=d.deferred,
        mode=d.mode,
        context=r.c.encode(),
        ranking=ranking,
        probabilities=probabilities,
        baseline=baseline,
        model_id=r.m,
        episode=d.episode,
        slots=slots,
    )
