"""The reward join, run by the embedded worker and the Kafka path's joiner alike: decisions
whose window closed (or that are complete early) are joined with their observations under the
loop's rules (learners.joiner) and become joined interactions learners train on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy.orm import Session, sessionmaker

from learners import guardrails, rollups
from learners.joiner import (
    DecisionView,
    JoinResult,
    JoinRules,
    Obs,
    SlotDecision,
    can_complete_early,
    in_window,
    is_complete,
    join,
)
from learners.outcomes import REWARD, RewardRules
from service.core import record
from service.storage import store
from service.storage.models import Decision, Observation
from service.storage.store.stats import bucket_of


def join_due(
    session: Session,
    *,
    loop: str,
    rules: JoinRules,
    now: float,
    limit: int,
    max_dangling: int = store.MAX_DANGLING,
    tracked: Sequence[str] = (),
) -> int:
    """Join decisions whose window closed, or that are complete early; returns how many.
    Keeps at most `max_dangling` dangling observations in the loop (store.drop_dangling).
    `tracked`: the outcomes rolled up per bucket (named ones, guarded ones)."""
    store.mark_dangling(session, loop=loop, now=now, keep=max_dangling)
    candidates = store.decisions_to_join(
        session,
        loop=loop,
        wait=rules.wait,
        now=now,
        limit=limit,
        earliest=can_complete_early(rules),
    )
    if not candidates:
        return 0
    by_event = store.observations_of(session, loop=loop, event_ids=[d.event_id for d in candidates])
    stats = Rollup(
        center=store.mean_reward(session, loop=loop), rules=rules.rewards, tracked=tracked
    )
    statuses: dict[int, str] = {}
    rows = [
        row
        for d in candidates
        if (row := _join_one(d, by_event[d.event_id], rules, stats, statuses, loop=loop, now=now))
        is not None
    ]
    store.mark_joined(
        session, loop=loop, event_ids=[r["event_id"] for r in rows], statuses=statuses
    )
    store.add_joined(session, rows)
    store.add_stats(session, loop=loop, sums=stats.sums)
    store.add_actions(session, loop=loop, counts=stats.actions)
    store.add_outcome_stats(session, loop=loop, sums=stats.outcomes)
    if stats.late:
        store.count_events(session, "late", {loop: stats.late})
    return len(rows)


class Rollup:
    """What a join batch adds to its loop's rollups (learners.rollups), per bucket and slot,
    and, for a loop with named outcomes or guardrails (`rules`), per bucket and outcome
    (learners.guardrails.sums). `center`: the loop's mean reward before the batch (the holdout
    effect's centre)."""

    def __init__(
        self, *, center: float, rules: RewardRules | None = None, tracked: Sequence[str] = ()
    ) -> None:
        self.center = center
        self.rules = rules
        self.tracked = tracked
        self.sums: dict[tuple[int, str], dict[str, float]] = {}
        self.actions: dict[tuple[int, str, str], int] = {}
        self.outcomes: dict[tuple[int, str], dict[str, float]] = {}
        self.late: list[float] = []

    def _add_outcomes(
        self, bucket: int, r: record.Decision | record.SlotsDecision, result: JoinResult
    ) -> None:
        """Each outcome's value for the decision (its default if it never arrived,
        RewardRules.value; a multi-slot decision's: the mean over its slots) and the sums
        behind the guardrails. Multi-slot: the baseline's weight is over the whole page."""
        assert self.rules is not None
        if isinstance(r, record.SlotsDecision):
            chosen = [(s.a[0] if s.a else -1, s.p[0] if s.p else 0.0) for s in r.s]
            same = all(a == b for (a, _), b in zip(chosen, r.b, strict=True))
            p = math.prod(q for _, q in chosen)
            ranking, probabilities, baseline = [0], [p], 0 if same else 1
        else:
            ranking, probabilities, baseline = r.a, r.p, r.b
        for name in self.tracked:
            values = [self.rules.value(o, name) for o in result.outcomes] or [0.0]
            y = sum(values) / len(values)
            sums = guardrails.sums(
                y,
                share=r.h,
                held=r.ho,
                ranking=ranking,
                probabilities=probabilities,
                baseline=baseline,
            )
            rollups.add(self.outcomes.setdefault((bucket, name), {}), sums)

    def add(self, r: record.Decision | record.SlotsDecision, result: JoinResult) -> None:
        bucket = bucket_of(r.t)
        if self.rules is not None and self.tracked and result.learnable:
            self._add_outcomes(bucket, r, result)
        ids = [a["_tag"] for a in orjson.loads(r.c)["_multi"]]
        if isinstance(r, record.SlotsDecision):
            for slot, baseline, outcome in zip(r.s, r.b, result.slots, strict=True):
                self._add((bucket, slot.id), ids, (slot.a, slot.p, baseline), outcome, r, result)
            # The whole decision: the slots' mean reward (the joined row's).
            whole = rollups.outcome(
                reward=result.reward,
                rewarded=result.rewarded,
                learnable=result.learnable,
                share=r.h,
                held=r.ho,
                center=self.center,
            )
            rollups.add(self.sums.setdefault((bucket, ""), {}), whole)
        else:
            outcome = (result.reward, result.rewarded)
            self._add((bucket, ""), ids, (r.a, r.p, r.b), outcome, r, result)

    def _add(
        self,
        key: tuple[int, str],
        ids: list[str],
        choice: tuple[list[int], list[float], int],
        outcome: tuple[float, bool],
        r: record.Decision | record.SlotsDecision,
        result: JoinResult,
    ) -> None:
        """One decision or one slot: `choice` (ranking, probabilities, baseline) as logged,
        `outcome` (reward, whether one arrived)."""
        ranking, probabilities, baseline = choice
        sums = rollups.increments(
            ranking=ranking,
            probabilities=probabilities,
            baseline=baseline,
            reward=outcome[0],
            rewarded=outcome[1],
            learnable=result.learnable,
            share=r.h,
            held=r.ho,
            center=self.center,
        )
        rollups.add(self.sums.setdefault(key, {}), sums)
        if result.learnable and ranking:
            action = (*key, ids[ranking[0]])
            self.actions[action] = self.actions.get(action, 0) + 1


def _join_one(
    d: Decision,
    observations: list[Observation],
    rules: JoinRules,
    stats: Rollup,
    statuses: dict[int, str],
    *,
    loop: str,
    now: float,
) -> dict[str, Any] | None:
    """The joined row of decision `d`, adding it to `stats` and its observations' new status
    to `statuses` (store.mark_joined writes both marks); None if its window is still open and
    it is not complete yet."""
    r = _decision(d)
    view = view_of(d, r)
    obs = [Obs(o.kind, o.value, o.received_at, o.slot, o.name or REWARD) for o in observations]
    if d.created_at > now - rules.wait and not is_complete(view, obs, rules):
        return None
    result = join(view, obs, rules)
    observed_at = None
    for o in observations:
        if in_window(d.created_at, o.received_at, rules.wait):
            statuses[o.id] = "joined"
            if o.kind == "reward":
                observed_at = max(observed_at or o.received_at, o.received_at)
        else:
            statuses[o.id] = "late"
            stats.late.append(o.received_at)
    stats.add(r, result)
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
        "observed_at": observed_at,
        "reward_version": rules.rewards.version,
    }


def _decision(d: Decision) -> record.Decision | record.SlotsDecision:
    r = record.decode(d.record)
    if not isinstance(r, record.Decision | record.SlotsDecision):
        raise record.RecordError(f"decision {d.event_id} holds a record of another kind")
    return r


def view_of(d: Decision, r: record.Decision | record.SlotsDecision | None = None) -> DecisionView:
    """What the join rules need of a stored decision (`r`: its record, if decoded already)."""
    r = r if r is not None else _decision(d)
    slots: list[SlotDecision] = []
    if isinstance(r, record.SlotsDecision):
        # Multi-slot: the first slot stands for the decision where one is needed.
        slots = [SlotDecision(s.id, s.a, s.p, b) for s, b in zip(r.s, r.b, strict=True)]
        ranking, probabilities, baseline = slots[0].ranking, slots[0].probabilities, r.b[0]
    else:
        ranking, probabilities, baseline = r.a, r.p, r.b
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


def compact_stats(sessions: sessionmaker[Session], now: float) -> int:
    """Keep rollups older than store.COMPACT_AFTER per hour (store.compact), a transaction per
    batch of hours; returns how many hours were merged. Run by the embedded worker and the
    Kafka path's joiner every few minutes."""
    merged = 0
    while True:
        with sessions.begin() as session:
            n = store.compact(session, before=now - store.COMPACT_AFTER)
        merged += n
        if n < 2000:
            return merged
