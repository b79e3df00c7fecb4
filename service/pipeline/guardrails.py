"""Guardrails checked as events join (learners.guardrails has the statistics): after a join
batch, each guardrail of the loop is judged on the decisions since its window began; a
breach or a recovery changes its state, is logged, and a `fallback` guardrail puts the loop in
fallback (serving reads it: service.pipeline.runtime.LoopRuntime.holdout_share) or takes it out.
Run by the embedded worker and the Kafka path's joiners alike, in the join's transaction."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from learners.guardrails import Guardrail, Verdict, check
from service.storage import store
from service.storage.models import GuardrailState

log = logging.getLogger("dloop.guardrails")

CHECK_EVERY = 1.0  # seconds between two checks of a guardrail


def check_loop(
    session: Session, *, loop: str, guardrails: Sequence[Guardrail], now: float
) -> bool | None:
    """Check the loop's guardrails; returns whether the loop is now in fallback if that
    changed, else None."""
    states = store.guardrail_states(session, loop=loop)
    keys = {g.key for g in guardrails}
    if set(states) - keys:
        store.drop_guardrail_states(session, loop=loop, keep=keys)
    before = any(s.fallback for s in states.values())
    after = False
    if keys - set(states):  # set before this process knew of them: they start now
        store.start_guardrails(session, loop=loop, keys=keys, now=now)
        session.flush()
        states = store.guardrail_states(session, loop=loop)
    for g in guardrails:
        state = states[g.key]
        if now - state.checked_at >= CHECK_EVERY:
            _judge(session, loop, g, state, now)
        after |= bool(state.fallback)
    return after if after != before else None


def _judge(session: Session, loop: str, g: Guardrail, state: GuardrailState, now: float) -> None:
    sums = store.outcome_sums(session, loop=loop, outcome=g.outcome, since=state.since)
    verdict = check(g, sums)
    state.checked_at = now
    state.figures = figures(verdict)
    if state.state == "ok" and verdict.status == "breached":
        state.state, state.since, state.changed_at = "breached", now, now
        log.warning(
            "loop %s: guardrail %s breached: %s %.4g against %s %.4g over %d decisions "
            "(tolerance %g; always-valid 95%% interval of the excess %s)%s",
            loop,
            g.key,
            g.outcome,
            verdict.policy_mean,
            verdict.comparator,
            verdict.comparator_mean,
            verdict.decisions,
            g.tolerance,
            _interval(verdict),
            "; falling back to the holdout policy" if g.action == "fallback" else "",
        )
    elif state.state == "breached" and verdict.status == "safe":
        state.state, state.since, state.changed_at = "ok", now, now
        log.warning(
            "loop %s: guardrail %s recovered: %s %.4g against %s %.4g over %d decisions%s",
            loop,
            g.key,
            g.outcome,
            verdict.policy_mean,
            verdict.comparator,
            verdict.comparator_mean,
            verdict.decisions,
            "; the model serves again" if state.fallback else "",
        )
    state.fallback = state.state == "breached" and g.action == "fallback"


def _interval(v: Verdict) -> str:
    return f"[{v.interval[0]:.4g}, {v.interval[1]:.4g}]"


def figures(v: Verdict) -> dict[str, Any]:
    def number(x: float) -> float | None:
        return round(x, 6) if math.isfinite(x) else None

    return {
        "status": v.status,
        "comparator": v.comparator,
        "policyMean": number(v.policy_mean),
        "comparatorMean": number(v.comparator_mean),
        "excess": number(v.effect),
        "alwaysValid95": [number(v.interval[0]), number(v.interval[1])],
        "decisions": v.decisions,
    }
