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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from learners.ccb import ccb_line
from learners.dsjson import timestamp
from learners.features import cb_line
from learners.outcomes import REWARD, RewardRules

BACKWARD_WINDOW = 120.0


@dataclass(frozen=True)
class Obs:
    kind: str  # "reward" | "activate"
    value: float | None
    received_at: float
    slot: str | None = None  # multi-slot rewards
    name: str = REWARD  # a reward's outcome (learners.outcomes): Personalizer's is `reward`


@dataclass(frozen=True)
class SlotDecision:
    id: str
    ranking: Sequence[int]  # 0-based action indices, chosen first
    probabilities: Sequence[float]
    baseline: int


@dataclass(frozen=True)
class JoinRules:
    wait: float
    default_reward: float
    aggregation: str
    # Named outcomes and the reward definition (None: Personalizer's reward only).
    named: RewardRules | None = None

    @property
    def rewards(self) -> RewardRules:
        if self.named is not None:
            return self.named
        return RewardRules.personalizer(self.default_reward, self.aggregation)


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
    episode: str | None = None
    slots: Sequence[SlotDecision] = ()  # multi-slot decisions (then `context` is the CCB `c`)


@dataclass(frozen=True)
class JoinResult:
    line: bytes
    learnable: bool
    reward: float
    rewarded: bool
    imitated: bool
    # Multi-slot: per slot (its reward, whether one was received), in the decision's slot order.
    slots: tuple[tuple[float, bool], ...] = ()
    # The aggregated outcomes (multi-slot: per slot, in slot order).
    outcomes: tuple[dict[str, float], ...] = ()


def in_window(created_at: float, received_at: float, wait: float) -> bool:
    return created_at - BACKWARD_WINDOW <= received_at <= created_at + wait


def can_complete_early(rules: JoinRules) -> bool:
    """Whether a decision may be joined before its window ends (every outcome it waits for
    keeps its earliest value)."""
    return rules.rewards.early()


def is_complete(decision: DecisionView, observations: Sequence[Obs], rules: JoinRules) -> bool:
    """True when no later observation can change the joined result before the window ends:
    every tracked outcome (learners.outcomes) arrived, per slot if multi-slot."""
    named = rules.rewards
    if not named.early():
        return False
    counted = [o for o in observations if in_window(decision.created_at, o.received_at, rules.wait)]
    activated = any(o.kind == "activate" for o in counted)
    arrived = {(o.slot, o.name) for o in counted if o.kind == "reward"}
    slots = [s.id for s in decision.slots] if decision.slots else [None]
    rewarded = all((slot, name) in arrived for slot in slots for name in named.tracked)
    return rewarded and (activated or not decision.deferred)


def _observation(o: Obs, event_id: str, slot: str | None = None) -> dict[str, Any]:
    """An observation as the joined line's `o` keeps it (Personalizer's shape; a named outcome
    also says its name)."""
    if o.kind != "reward":
        return {"EventId": event_id, "ActionTaken": True}
    doc: dict[str, Any] = {"v": o.value}
    if o.name != REWARD:
        doc["Outcome"] = o.name
    doc["EventId"] = event_id
    if slot is not None:
        doc["Index"] = slot
    doc["ActionTaken"] = False
    return doc


def join(decision: DecisionView, observations: Sequence[Obs], rules: JoinRules) -> JoinResult:
    """The joined DSJSON line for `decision` given every observation of its eventId."""
    ordered = sorted(observations, key=lambda o: o.received_at)
    counted = [o for o in ordered if in_window(decision.created_at, o.received_at, rules.wait)]
    if decision.slots:
        return _join_slots(decision, counted, rules)
    named = rules.rewards
    outcomes = named.aggregate(
        (o.name, o.value) for o in counted if o.kind == "reward" and o.value is not None
    )
    reward, rewarded = named.reward(outcomes)
    activated = any(o.kind == "activate" for o in counted)
    learnable = activated or not decision.deferred
    imitated = decision.ranking[0] == decision.baseline
    # Apprentice mode learns to imitate the baseline: reward 1 when the model's own choice
    # was the baseline; the observed reward is kept as _original_label_cost.
    cost = -(1.0 if imitated else 0.0) if decision.mode == "Apprentice" else -reward
    obs_json = [_observation(o, decision.event_id) for o in counted]
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
        episode_id=decision.episode,
        outcomes=outcomes if named.named else None,
        version=named.version,
    )
    return JoinResult(line, learnable, reward, rewarded, imitated, outcomes=(outcomes,))


def _join_slots(decision: DecisionView, counted: Sequence[Obs], rules: JoinRules) -> JoinResult:
    """Multi-slot: each slot's rewards are aggregated on their own (unrewarded slots get the
    default), activation (for all slots) decides learnability, and apprentice mode imitates
    each slot's baseline. The Joined row's reward is the slots' mean."""
    activated = any(o.kind == "activate" for o in counted)
    learnable = activated or not decision.deferred
    named = rules.rewards
    outcomes = []
    rewards = []
    per_slot: list[tuple[float, bool]] = []
    slot_outcomes: list[dict[str, float]] = []
    rewarded = False
    imitated = True
    for slot in decision.slots:
        mine = [o for o in counted if o.kind == "reward" and o.slot == slot.id]
        values = named.aggregate((o.name, o.value) for o in mine if o.value is not None)
        reward, got = named.reward(values)
        rewarded |= got
        rewards.append(reward)
        per_slot.append((reward, got))
        slot_outcomes.append(values)
        copies = bool(slot.ranking) and slot.ranking[0] == slot.baseline
        imitated &= copies
        cost = -(1.0 if copies else 0.0) if decision.mode == "Apprentice" else -reward
        outcomes.append(
            {
                "id": slot.id,
                "a": slot.ranking,
                "p": slot.probabilities,
                "cost": cost,
                "original": -reward,
                "o": [_observation(o, decision.event_id, slot.id) for o in mine],
                **({"outcomes": values} if named.named else {}),
            }
        )
    line = ccb_line(
        event_id=decision.event_id,
        timestamp=timestamp(decision.created_at),
        c=orjson.loads(decision.context),
        outcomes=outcomes,
        baselines=[slot.baseline for slot in decision.slots],
        model_id=decision.model_id,
        skip_learn=not learnable,
        version=named.version,
    )
    mean = sum(rewards) / len(rewards) if rewards else rules.default_reward
    return JoinResult(
        line, learnable, mean, rewarded, imitated, tuple(per_slot), tuple(slot_outcomes)
    )
