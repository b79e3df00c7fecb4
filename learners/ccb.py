"""Multi-slot ranking on VW's conditional contextual bandit (`--ccb_explore_adf`).

Serving fills the slots in request order. For each slot dloop asks the model for a probability
over the actions still available to it (not excluded for that slot, not taken by an earlier
slot; VW's `_inc`), draws one with the event's seed, and moves on, so every slot's logged
probability is the one its action was really drawn with, and an action fills at most one slot.

The decision is logged as a CCB DSJSON line (`ccb_line`, Personalizer's §3.2 shape): `c` holds
the shared features, the actions (`_multi`) and the slots (`_slots`, each with its features and
`_inc`), `_outcomes` one label per slot (chosen action first in `_a`, with `_p`), `_ba` the
baselines. `vw --ccb_explore_adf --dsjson` learns from exactly that line (learners.cb.CBTrainer
trains either reduction from DSJSON), so serving, learning, export and replay read one format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson

from learners import vw
from learners.features import Features, action_json
from learners.sampling import sample
from learners.vw import Workspace

DEFAULT_CCB_POLICY = "--ccb_explore_adf --squarecb -q ::"
PERSONALIZER_CCB_POLICY = "--ccb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::"
NAMED_CCB_POLICIES = {
    "dloop-ccb": DEFAULT_CCB_POLICY,
    "personalizer-ccb-default": PERSONALIZER_CCB_POLICY,
}


def ccb_context(
    context: Features,
    actions: Sequence[tuple[str, Features]],
    slots: Sequence[tuple[str, Features, Sequence[int]]],
) -> dict[str, Any]:
    """The `c` object: shared features, actions, and slots (id, features, allowed actions)."""
    return {
        "FromUrl": context,
        "_multi": [action_json(aid, feats) for aid, feats in actions],
        "_slots": [
            {"_id": sid, "sj": feats, "_inc": list(allowed)} for sid, feats, allowed in slots
        ],
    }


class CCBRanker:
    """Fills slots one by one from a trained model (or uniformly without one)."""

    def __init__(self, model: bytes | None) -> None:
        self._ws = vw.workspace("--json", model) if model is not None else None

    @classmethod
    def loaded(cls, ws: Workspace | None) -> CCBRanker:
        """A ranker on a workspace someone else owns (a sandbox child's model cache)."""
        ranker = cls(None)
        ranker._ws = ws
        return ranker

    def slot_pmf(self, c: dict[str, Any], slot: dict[str, Any], allowed: list[int]) -> list[float]:
        """Probabilities over `allowed` (action indices) for one slot."""
        if self._ws is None or not allowed:
            return [1.0 / len(allowed)] * len(allowed) if allowed else []
        one = {**c, "_slots": [{**slot, "_inc": allowed}]}
        scores = vw.predict_decisions(self._ws, orjson.dumps(one).decode())[0]
        by_action = dict(scores)
        pmf = [float(by_action.get(a, 0.0)) for a in allowed]
        # Uniform when the scores are not numbers (overflowed: learners.sampling.restrict).
        return pmf if 0 < sum(pmf) < math.inf else [1.0 / len(allowed)] * len(allowed)

    def rank(
        self, c: dict[str, Any], allowed: Sequence[Sequence[int]], seed: str
    ) -> list[tuple[int, list[int], list[float]]]:
        """Per slot: (chosen action, candidate actions chosen first, their probabilities)."""
        taken: set[int] = set()
        out: list[tuple[int, list[int], list[float]]] = []
        for k, slot in enumerate(c["_slots"]):
            candidates = [a for a in allowed[k] if a not in taken]
            if not candidates:
                out.append((-1, [], []))
                continue
            pmf = self.slot_pmf(c, slot, candidates)
            i = sample(pmf, f"{seed}/{slot['_id']}")
            chosen = candidates[i]
            taken.add(chosen)
            rest = sorted((j for j in range(len(candidates)) if j != i), key=lambda j: -pmf[j])
            order = [i, *rest]
            out.append((chosen, [candidates[j] for j in order], [pmf[j] for j in order]))
        return out


def ccb_line(
    *,
    event_id: str,
    timestamp: str,
    c: dict[str, Any],
    outcomes: Sequence[dict[str, Any]],
    baselines: Sequence[int],
    model_id: str,
    skip_learn: bool = False,
    version: int = 0,
) -> bytes:
    """One CCB DSJSON line. `outcomes` per slot: {"id", "a", "p", "cost", "original", "o"} and
    optionally "outcomes", its aggregated named outcomes; `version`: the reward definition's
    (learners.outcomes; keys VW ignores)."""
    doc: dict[str, Any] = {"Timestamp": timestamp, "Version": "1", "EventId": event_id}
    if version:
        doc["RewardVersion"] = version
    if skip_learn:
        doc["_skipLearn"] = True
    doc["c"] = c
    doc["_outcomes"] = [
        {
            "_label_cost": o["cost"],
            "_id": o["id"],
            "_a": list(o["a"]),
            "_p": list(o["p"]),
            "_o": list(o.get("o", [])),
            "_original_label_cost": o["original"],
            **({"Outcomes": o["outcomes"]} if "outcomes" in o else {}),
        }
        for o in outcomes
    ]
    doc["_ba"] = list(baselines)
    doc["VWState"] = {"m": model_id}
    return orjson.dumps(doc)
