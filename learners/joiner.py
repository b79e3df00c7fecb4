"""Reward join rules: which observations count for a decision, and what it learns from them.

Personalizer's semantics (API-personalizer.md §2) with dloop's choices (API.md):
- an observation counts if it was received no more than 2 minutes before the decision and no
  later than rewardWaitTime after it; anything else is late (logged, never trained);
- several rewards combine by the aggregation; no reward means defaultReward;
- a deferred decision is learnable only once activated within the window;
- with `earliest`, a decision is complete at its first reward (and activation, if deferred), so it
  is joined then instead of at the end of the window: later rewards could not change its label.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from learners.features import cb_line

BACKWARD_WINDOW = 120.0

AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "earliest": lambda values: values[0],
    "sum": lambda values: float(sum(values)),
    "average": statistics.fmean,
    "min": min,
    "max": max,
    "median": statistics.median,
}


@dataclass(frozen=True)
class Obs:
    kind: str  # "reward" | "activate"
    value: float | None
    received_at: float


@dataclass(frozen=True)
class JoinRules:
    wait: float
    default_reward: float
    aggregation: str


@dataclass(frozen=True)
class DecisionView:
    event_id: str
    created_at: float
    deferred: bool
    mode: str
    context: bytes
    ranking: Sequence[int]
    probabilities: Sequence[float]
    baseline: int
    model_id: str


@dataclass(frozen=True)
class JoinResult:
    line: bytes
    learnable: bool
    reward: float
    rewarded: bool
    imitated: bool


def in_window(created_at: float, received_at: float, wait: float) -> bool:
    return created_at - BACKWARD_WINDOW <= received_at <= created_at + wait


def aggregate(values: Sequence[float], how: str, default: float) -> float:
    """Combine reward values (in arrival order); `default` when there are none."""
    if not values:
        return default
    return float(AGGREGATIONS[how](values))


def is_complete(decision: DecisionView, observations: Sequence[Obs], rules: JoinRules) -> bool:
    """True when no later observation can change the joined result before the window ends."""
    if rules.aggregation != "earliest":
        return False
    counted = [o for o in observations if in_window(decision.created_at, o.received_at, rules.wait)]
    rewarded = any(o.kind == "reward" for o in counted)
    activated = any(o.kind == "activate" for o in counted)
    return rewarded and (activated or not decision.deferred)


def timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def join(decision: DecisionView, observations: Sequence[Obs], rules: JoinRules) -> JoinResult:
    """The joined DSJSON line for `decision` given every observation of its eventId."""
    ordered = sorted(observations, key=lambda o: o.received_at)
    counted = [o for o in ordered if in_window(decision.created_at, o.received_at, rules.wait)]
    values = [o.value for o in counted if o.kind == "reward" and o.value is not None]
    activated = any(o.kind == "activate" for o in counted)
    reward = aggregate(values, rules.aggregation, rules.default_reward)
    learnable = activated or not decision.deferred
    imitated = decision.ranking[0] == decision.baseline
    # Apprentice mode learns to imitate the baseline: reward 1 when the model's own choice
    # was the baseline; the observed reward is kept as _original_label_cost.
    cost = -(1.0 if imitated else 0.0) if decision.mode == "Apprentice" else -reward
    obs_json = [
        {"v": o.value, "EventId": decision.event_id, "ActionTaken": False}
        if o.kind == "reward"
        else {"EventId": decision.event_id, "ActionTaken": True}
        for o in counted
    ]
    line = cb_line(
        event_id=decision.event_id,
        timestamp=timestamp(decision.created_at),
        context=decision.context,
        ranking=decision.ranking,
        probabilities=decision.probabilities,
        model_id=decision.model_id,
        cost=cost,
        original_cost=-reward,
        observations=obs_json,
        skip_learn=not learnable,
        deferred=decision.deferred,
    )
    return JoinResult(line, learnable, reward, bool(values), imitated)
