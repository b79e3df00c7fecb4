"""The rank decision, from a parsed request (service.core.requests) and the model's scores to the
order served, the probabilities it was drawn with and the response: the one implementation the
API (service.api.routes.events) and the in-process ranker (service.local) share, so a local
decision is the server's decision for the same model and request. Only how VW is asked for the
scores differs (a ranking sandbox on the server, a workspace in the application's process).

`Serving` is what a decision needs to know of its loop (service.pipeline.runtime builds it on
the server; the local ranker reads it from GET .../local/settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from learners.constraints import cap, limit_exploration, limits_of
from learners.features import FeatureError, actions_json
from learners.holdout import holdout_pmf, holdout_slots, in_holdout
from learners.rl import epsilon_greedy
from learners.sampling import restrict, sample
from learners.tiles import TileCoding
from service.core import record
from service.core.requests import rank_error


@dataclass(frozen=True)
class Serving:
    """A loop's serving settings: kind, learning mode, the holdout's share (with a fallback's)
    and policy, exploration (RL loops explore outside VW), serving-time constraints."""

    loop: str
    kind: str
    mode: str
    holdout_share: float
    holdout_policy: str
    exploration: float
    explores_in_vw: bool
    episodic: bool
    max_exploration: float | None = None
    explain: bool = False
    tiles: TileCoding | None = None

    def to_doc(self) -> dict[str, Any]:
        """Its JSON form (in GET .../local/settings and in a ranking process's call)."""
        return {
            "loop": self.loop,
            "kind": self.kind,
            "mode": self.mode,
            "holdoutShare": self.holdout_share,
            "holdoutPolicy": self.holdout_policy,
            "exploration": self.exploration,
            "exploresInVw": self.explores_in_vw,
            "episodic": self.episodic,
            "maxExplorationProbability": self.max_exploration,
            "explain": self.explain,
            "tileCoding": self.tiles.to_doc() if self.tiles is not None else None,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Serving:
        tiles = doc.get("tileCoding")
        return cls(
            loop=doc["loop"],
            kind=doc["kind"],
            mode=doc["mode"],
            holdout_share=doc["holdoutShare"],
            holdout_policy=doc["holdoutPolicy"],
            exploration=doc["exploration"],
            explores_in_vw=doc["exploresInVw"],
            episodic=doc["episodic"],
            max_exploration=doc["maxExplorationProbability"],
            explain=doc["explain"],
            tiles=TileCoding.from_doc(tiles) if tiles else None,
        )


def code_tiles(tiles: TileCoding | None, req: dict[str, Any]) -> None:
    """Tile-code the parsed request's context features if the loop says so (learners.tiles):
    what the model scores and the log holds. A coded feature that is not numeric is refused
    like any bad feature."""
    if tiles is not None:
        try:
            req["context"] = tiles.apply(req["context"])
        except FeatureError as exc:
            raise rank_error(str(exc)) from None


def scored_actions(req: dict[str, Any], multi: bytes, *, has_model: bool) -> bytes:
    """The actions VW scores (their JSON, `multi` for all of them): with a model and excluded
    actions, only the eligible ones (an excluded action's features never reach the model)."""
    eligible: list[bool] = req["eligible"]
    if not has_model or all(eligible):
        return multi
    ids, features = req["ids"], req["features"]
    return actions_json([(a, f) for a, f, ok in zip(ids, features, eligible, strict=True) if ok])


def policy_pmf(
    s: Serving, req: dict[str, Any], scores: Sequence[float], *, has_model: bool
) -> list[float]:
    """The policy's probabilities for every action (0 for excluded ones): uniform before the
    first model; an RL loop's scores explored here (learners.rl)."""
    eligible: list[bool] = req["eligible"]
    if not has_model:
        return restrict([1.0] * len(eligible), eligible)
    if not s.explores_in_vw:
        scores = epsilon_greedy(list(scores), s.exploration)
    if len(scores) == len(eligible):  # every action scored: none excluded
        return restrict(scores, eligible)
    it = iter(scores)
    return restrict([next(it) if ok else 0.0 for ok in eligible], eligible)


def held_out(s: Serving, req: dict[str, Any], episode: str | None) -> bool:
    """The live holdout, sticky per unitId, else per episode, else per event."""
    return in_holdout(s.loop, req["unit"] or episode or req["event_id"], s.holdout_share)


def logging_only(eligible: Sequence[bool]) -> tuple[list[int], list[float]]:
    """LoggingOnly: serve and log the input order; the baseline is the chosen action."""
    baseline = list(eligible).index(True)
    order = [i for i, ok in enumerate(eligible) if ok] + [
        i for i, ok in enumerate(eligible) if not ok
    ]
    return order, [1.0 if i == baseline else 0.0 for i in range(len(eligible))]


def constrained(
    s: Serving, pmf: list[float], req: dict[str, Any], over: Mapping[str, float] | None
) -> list[float]:
    """The serving-time constraints (learners.constraints), in Online mode: the decision is
    drawn from, and logged with, what they return. `over`: the actions at or over their
    exposure cap, with their cap (learners.constraints.ExposureCaps.over)."""
    if s.mode != "Online":
        return pmf
    if s.max_exploration is not None:
        pmf = restrict(limit_exploration(pmf, s.max_exploration), req["eligible"])
    limits = limits_of(req["ids"], over) if over else None
    if limits:
        pmf = cap(pmf, req["eligible"], limits)
    return pmf


def decide(
    s: Serving,
    req: dict[str, Any],
    pmf: list[float],
    *,
    held: bool,
    over: Mapping[str, float] | None = None,
) -> tuple[list[int], list[float]]:
    """The served order (chosen first) and the probabilities it was drawn with, from the
    policy's probabilities: the holdout policy's for a held-out decision, else the policy's
    under the loop's constraints; drawn with the eventId's seed."""
    eligible: list[bool] = req["eligible"]
    pmf = holdout_pmf(s.holdout_policy, eligible) if held else constrained(s, pmf, req, over)
    chosen = sample(pmf, f"{s.loop}/{req['event_id']}")
    # The rest by falling probability, ties in request order (a stable sort stays stable
    # reversed).
    order = sorted(range(len(pmf)), key=pmf.__getitem__, reverse=True)
    order.remove(chosen)
    return [chosen, *order], pmf


Decided = list[tuple[int, list[int], list[float]]]  # per slot: chosen, order, probabilities


def check_slots(decided: Decided) -> Decided:
    if any(chosen < 0 for chosen, _, _ in decided):
        raise rank_error("a slot has no action left (too many exclusions)")
    return decided


def logging_only_slots(slots: list[dict[str, Any]]) -> Decided:
    """LoggingOnly, multi-slot: every slot serves (and logs) its baseline."""
    return [(slot["baseline"], [slot["baseline"]], [1.0]) for slot in slots]


def held_slots(s: Serving, slots: list[dict[str, Any]], seed: str) -> Decided:
    """A held-out multi-slot decision: every slot served by the holdout policy."""
    return check_slots(
        holdout_slots(
            s.holdout_policy,
            [slot["id"] for slot in slots],
            [slot["allowed"] for slot in slots],
            [slot["baseline"] for slot in slots],
            seed,
        )
    )


def slots_decision(
    s: Serving,
    req: dict[str, Any],
    slots: list[dict[str, Any]],
    c: dict[str, Any],
    decided: Decided,
    *,
    held: bool,
    model_id: str,
    now: float,
) -> record.SlotsDecision:
    """The log record of a multi-slot decision."""
    return record.SlotsDecision(
        loop=s.loop,
        id=req["event_id"],
        t=now,
        deferred=req["defer"],
        mode=s.mode,
        c=orjson.dumps(c).decode(),
        s=[
            record.SlotChoice(slot["id"], order, probs)
            for slot, (_, order, probs) in zip(slots, decided, strict=True)
        ],
        b=[slot["baseline"] for slot in slots],
        m=model_id,
        h=s.holdout_share,
        ho=held,
    )


def rank_document(decision: record.Decision, ids: list[str], pmf: list[float]) -> dict[str, Any]:
    """The rank response (Personalizer's shape; dloop adds the holdout mark)."""
    if decision.mode == "Apprentice":
        # The model's choice is logged (to learn imitation); the baseline is served.
        baseline = decision.b
        served = [baseline] + [i for i in range(len(ids)) if i != baseline]
        ranking = [{"id": ids[i], "probability": 1.0 if i == baseline else 0.0} for i in served]
    else:
        ranking = [{"id": ids[i], "probability": pmf[i]} for i in decision.a]
    doc: dict[str, Any] = {
        "ranking": ranking,
        "eventId": decision.id,
        "rewardActionId": ranking[0]["id"],
    }
    if decision.x is not None:
        doc["inferenceExplanation"] = decision.x
    if decision.ho:
        doc["holdout"] = True
    return doc


def slots_document(
    decision: record.SlotsDecision,
    ids: list[str],
    decided: list[tuple[int, list[int], list[float]]],
) -> dict[str, Any]:
    """The multi-slot response: per slot the action served and its probability (Apprentice:
    the baselines, certain)."""
    served = (
        [(b, 1.0) for b in decision.b]
        if decision.mode == "Apprentice"
        else [(chosen, probs[0]) for chosen, _, probs in decided]
    )
    doc: dict[str, Any] = {
        "eventId": decision.id,
        "slots": [
            {"id": slot.id, "rewardActionId": ids[a], "probability": p}
            for slot, (a, p) in zip(decision.s, served, strict=True)
        ],
    }
    if decision.ho:
        doc["holdout"] = True
    return doc
