"""Counterfactual evaluation of policies on a loop's logged decisions (DSJSON lines).

For every logged decision the estimators (learners.estimators) need the probability each
candidate policy gives the logged action. Policies:

- Online: the logging policy itself (its probabilities are in the log), so its estimate is the
  observed average reward.
- Baseline: always the first action that was not excluded (Personalizer's baseline).
- Random: uniform over the actions that were not excluded.
- Custom: any VW `--cb_explore_adf` arguments, trained on the same log in time order and asked
  for its probabilities on each decision before learning it (progressive validation), so no
  decision is scored by a model that has seen it.

Doubly robust estimates use a reward model trained the same progressive way: VW `--cb_adf` MTR
regression of the reward of the chosen action (label probability 1, no importance weights).

Excluded actions carry probability 0 in the log; every policy is restricted to the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from learners import estimators, outcomes, vw
from learners.dsjson import parse_time
from learners.outcomes import RewardRules
from learners.rl import relabel
from learners.sampling import restrict

REWARD_MODEL = "--cb_adf --cb_type mtr -q :: --power_t 0 -l 0.1"


@dataclass
class Logged:
    """One logged decision, by action index (0-based, order of the rank request)."""

    t: float
    reward: float
    chosen: int
    p: float  # logging probability of the chosen action
    eligible: list[bool]  # not excluded
    logged: list[float]  # logging probabilities by action index
    line: str
    baseline: int | None = None  # multi-slot: the slot's baselineAction
    ccb: dict[str, Any] | None = None  # multi-slot: the whole CCB line ...
    slot: int = 0  # ... and which of its slots this is
    # The named outcomes the line records (learners.outcomes; none before they existed).
    outcomes: dict[str, float] = field(default_factory=dict)


def _outcomes(doc: dict[str, Any]) -> dict[str, float]:
    recorded = doc.get("Outcomes")
    return {str(k): float(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}


def read_slots(lines: Iterable[str]) -> dict[str, list[Logged]]:
    """Multi-slot (CCB) lines as one single-slot decision per slot, by slot id: the slot's
    candidates (the actions still free for it), its logged probabilities, its reward, its
    baseline; the context is the shared features plus the slot's own. Every slot can then be
    evaluated like a single-slot loop (Personalizer evaluated only the first)."""
    out: dict[str, list[Logged]] = {}
    for line in lines:
        doc = orjson.loads(line)
        if doc.get("_skipLearn") or "_outcomes" not in doc:
            continue
        c = doc["c"]
        n = len(c["_multi"])
        for k, (outcome, slot) in enumerate(zip(doc["_outcomes"], c["_slots"], strict=True)):
            if not outcome["_a"]:
                continue
            logged = [0.0] * n
            for a, p in zip(outcome["_a"], outcome["_p"], strict=True):
                logged[a] = float(p)
            chosen = int(outcome["_a"][0])
            single = {
                "_label_cost": outcome["_label_cost"],
                "_label_probability": outcome["_p"][0],
                "_label_Action": chosen + 1,
                "_labelIndex": chosen,
                "Timestamp": doc["Timestamp"],
                "a": [a + 1 for a in outcome["_a"]],
                "c": {
                    "FromUrl": [*c.get("FromUrl", []), *slot.get("sj", [])],
                    "_multi": c["_multi"],
                },
                "p": outcome["_p"],
            }
            out.setdefault(outcome["_id"], []).append(
                Logged(
                    t=parse_time(doc["Timestamp"]),
                    reward=-float(outcome["_label_cost"]),
                    chosen=chosen,
                    p=float(outcome["_p"][0]),
                    eligible=[p > 0 for p in logged],
                    logged=logged,
                    line=orjson.dumps(single).decode(),
                    baseline=int(doc["_ba"][k]) if "_ba" in doc else None,
                    ccb=doc,
                    slot=k,
                    outcomes=_outcomes(outcome),
                )
            )
    for items in out.values():
        items.sort(key=lambda x: x.t)
    return out


def read(lines: Iterable[str]) -> list[Logged]:
    """Learnable, labelled single-slot lines (others cannot be evaluated)."""
    out = []
    for line in lines:
        doc = orjson.loads(line)
        if doc.get("_skipLearn") or "_label_cost" not in doc:
            continue
        ids, probs = doc["a"], doc["p"]
        n = len(doc["c"]["_multi"])
        logged = [0.0] * n
        for aid, p in zip(ids, probs, strict=True):
            logged[aid - 1] = float(p)
        out.append(
            Logged(
                t=parse_time(doc["Timestamp"]),
                reward=-float(doc["_label_cost"]),
                chosen=int(doc["_labelIndex"]),
                p=float(probs[0]),
                eligible=[p > 0 for p in logged],
                logged=logged,
                line=line,
                outcomes=_outcomes(doc),
            )
        )
    out.sort(key=lambda x: x.t)
    return out


def read_any(lines: Iterable[str]) -> dict[str, list[Logged]]:
    """Decisions grouped by slot id: one group per slot for multi-slot logs, else one ("")."""
    kept = list(lines)
    slots = read_slots(kept)
    return slots if slots else {"": read(kept)}


@dataclass
class PolicySpec:
    name: str
    source: str  # Online | Baseline | Random | Custom | OfflineExperimentation
    arguments: str = ""
    # A custom policy trained for another objective: it learns each decision relabelled
    # under these rules (learners.outcomes); every policy is evaluated on the same rewards.
    rules: RewardRules | None = None


Probabilities = Callable[[Logged], list[float]]


def _baseline(d: Logged) -> list[float]:
    if d.baseline is not None and d.eligible[d.baseline]:
        first = d.baseline
    else:
        first = d.eligible.index(True)
    return [1.0 if i == first else 0.0 for i in range(len(d.eligible))]


def _uniform(d: Logged) -> list[float]:
    return restrict([1.0] * len(d.eligible), d.eligible)


class Progressive:
    """A VW learner scored on each decision before it learns it. A multi-slot policy
    (`--ccb_explore_adf`) is asked for the slot's probabilities over the actions that were
    free for it (as serving does), then learns the whole CCB line."""

    def __init__(self, arguments: str, rules: RewardRules | None = None) -> None:
        self.ws = vw.workspace(f"{arguments} --dsjson")
        self.slots = "--ccb_explore_adf" in arguments
        self.rules = rules  # the objective it learns, if not the logged reward

    def _learned(self, line: str) -> str:
        return line if self.rules is None else outcomes.relabel(line, self.rules).decode()

    def __call__(self, d: Logged) -> list[float]:
        if self.slots and d.ccb is not None:
            return self._slot(d)
        pmf = vw.predict_scores(self.ws, d.line)
        vw.learn_line(self.ws, self._learned(d.line))
        return restrict(pmf, d.eligible)

    def _slot(self, d: Logged) -> list[float]:
        assert d.ccb is not None
        c = d.ccb["c"]
        candidates = [i for i, ok in enumerate(d.eligible) if ok]
        # VW's DSJSON reader answers a CCB line only with its outcomes; a placeholder outcome
        # (never learned: this line is only predicted) lists the slot's candidates.
        one = {
            "Timestamp": d.ccb["Timestamp"],
            "Version": "1",
            "EventId": "evaluate",
            "c": {**c, "_slots": [{**c["_slots"][d.slot], "_inc": candidates}]},
            "_outcomes": [
                {
                    "_label_cost": 0.0,
                    "_id": c["_slots"][d.slot]["_id"],
                    "_a": candidates,
                    "_p": [1.0 / len(candidates)] * len(candidates),
                    "_o": [],
                }
            ],
        }
        decisions = vw.predict_decisions(self.ws, orjson.dumps(one).decode())
        by_action = dict(decisions[0]) if decisions else {}
        vw.learn_line(self.ws, self._learned(orjson.dumps(d.ccb).decode()))
        return restrict([float(by_action.get(i, 0.0)) for i in range(len(d.eligible))], d.eligible)


@dataclass
class Result:
    spec: PolicySpec
    weights: np.ndarray
    rewards: np.ndarray
    rhat_chosen: np.ndarray
    rhat_target: np.ndarray
    times: np.ndarray
    estimates: dict[str, estimators.Estimate] = field(default_factory=dict)
    # Every named outcome's value under the policy (inverse propensity scoring; an outcome that
    # never arrived for a decision counts as its default there).
    outcomes: dict[str, estimators.Estimate] = field(default_factory=dict)

    def estimate(self, sl: slice | np.ndarray | None = None) -> dict[str, estimators.Estimate]:
        s = slice(None) if sl is None else sl
        w, r = self.weights[s], self.rewards[s]
        return {
            "ips": estimators.ips(r, w),
            "snips": estimators.snips(r, w),
            "dr": estimators.dr(r, w, self.rhat_chosen[s], self.rhat_target[s]),
        }


def _logged(d: Logged) -> list[float]:
    return d.logged


# The policies whose probabilities need no model; the others are VW policies.
FIXED: dict[str, Probabilities] = {"Online": _logged, "Baseline": _baseline, "Random": _uniform}


def evaluate(
    logged: list[Logged],
    policies: list[PolicySpec],
    *,
    progress: Callable[[float], None] | None = None,
    rules: RewardRules | None = None,
) -> list[Result]:
    """Score every policy on the logged decisions (one pass, all policies side by side), and
    on every named outcome; `rules`: the loop's outcomes, whose defaults stand for outcomes
    that never arrived (without them: 0)."""
    scorers = [
        FIXED.get(spec.source) or Progressive(spec.arguments, spec.rules) for spec in policies
    ]
    reward_model = vw.workspace(f"{REWARD_MODEL} --dsjson")
    n, k = len(logged), len(policies)
    weights = np.zeros((k, n))
    rhat_target = np.zeros((k, n))
    rhat_chosen = np.zeros(n)
    for i, d in enumerate(logged):
        rhat = [-c for c in vw.predict_scores(reward_model, d.line)]
        vw.learn_line(reward_model, relabel(d.line, -d.reward))
        rhat_chosen[i] = rhat[d.chosen]
        for j, score in enumerate(scorers):
            pi = score(d)
            weights[j, i] = pi[d.chosen] / d.p
            rhat_target[j, i] = float(np.dot(pi, rhat))
        if progress is not None and (i % 500 == 0 or i == n - 1):
            progress((i + 1) / n)
    rewards = np.array([d.reward for d in logged])
    times = np.array([d.t for d in logged])
    names = sorted({name for d in logged for name in d.outcomes})

    def value(d: Logged, name: str) -> float:
        return rules.value(d.outcomes, name) if rules is not None else d.outcomes.get(name, 0.0)

    values = {name: np.array([value(d, name) for d in logged]) for name in names}
    results = []
    for j, spec in enumerate(policies):
        res = Result(spec, weights[j], rewards, rhat_chosen, rhat_target[j], times)
        res.estimates = res.estimate()
        res.outcomes = {name: estimators.ips(y, weights[j]) for name, y in values.items()}
        results.append(res)
    return results


def outcome_table(results: list[Result]) -> list[list[str]]:
    """Policies x outcomes as printable rows: the training reward (doubly robust) and each
    named outcome (IPS), each an estimate with its 95% interval."""
    names = sorted({n for r in results for n in r.outcomes})
    rows = [["policy", "training reward", *names]]
    for r in results:
        cells = [_cell(r.estimates["dr"])] + [_cell(r.outcomes[n]) for n in names]
        rows.append([r.spec.name, *cells])
    return rows


def _cell(e: estimators.Estimate) -> str:
    return f"{e.value:.4g} [{e.low:.4g}, {e.high:.4g}]"


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


SERIES = {5: "Expanding", 60: "Rolling", 360: "Rolling", 720: "Rolling", 1440: "Rolling"}


def timeseries(res: Result, *, start: float, minutes: int, window: str) -> list[dict[str, Any]]:
    """The doubly robust estimate per interval (Rolling: the decisions in it; Expanding: all up
    to its end), computed from per-interval sums, so a long window of short intervals is cheap."""
    if not len(res.times):
        return []
    terms = estimators.dr_terms(res.rewards, res.weights, res.rhat_chosen, res.rhat_target)
    step = minutes * 60.0
    bucket = np.floor((res.times - start) / step).astype(int)
    ids, inverse = np.unique(bucket, return_inverse=True)
    n = np.bincount(inverse).astype(float)
    total = np.bincount(inverse, weights=terms)
    squares = np.bincount(inverse, weights=terms * terms)
    if window == "Expanding":
        n, total, squares = np.cumsum(n), np.cumsum(total), np.cumsum(squares)
    points = []
    for k, count, s1, s2 in zip(ids, n, total, squares, strict=True):
        mean = s1 / count
        if count > 1:
            var = max(s2 - count * mean * mean, 0.0) / (count - 1)
            half = estimators.Z95 * float(np.sqrt(var / count))
        else:
            half = float("inf")
        points.append(
            {
                "timeStamp": iso_time(start + (int(k) + 1) * step),
                "expectedReward": json_number(mean),
                "confidenceInterval": [json_number(mean - half), json_number(mean + half)],
            }
        )
    return points


def content(results: list[Result], *, start: float, end: float, slot: str = "") -> dict[str, Any]:
    """Personalizer's EvaluationResult: per policy a summary and a time series of the doubly
    robust estimate (5-minute intervals, expanding). dloop adds every estimator, the event count
    and the effective sample size to the summary, and under `dloopTimeseries` the series for
    every interval Personalizer's GET accepts ("60/Rolling", ...), which GET then serves."""
    value = []
    for res in results:
        est = res.estimates
        series = {
            f"{m}/{w}": timeseries(res, start=start, minutes=m, window=w) for m, w in SERIES.items()
        }
        value.append(
            {
                "name": res.spec.name,
                "arguments": res.spec.arguments,
                "slotId": slot,
                "policySource": res.spec.source,
                "summary": {
                    "expectedReward": json_number(est["dr"].value),
                    "confidenceInterval": [json_number(est["dr"].low), json_number(est["dr"].high)],
                    "estimator": "DR",
                    "events": len(res.rewards),
                    "effectiveSampleSize": json_number(
                        estimators.effective_sample_size(res.weights)
                    ),
                    "estimates": {
                        name: {
                            "expectedReward": json_number(e.value),
                            "confidenceInterval": [json_number(e.low), json_number(e.high)],
                        }
                        for name, e in est.items()
                    },
                    # dloop: every named outcome under this policy (IPS, 95% interval).
                    "outcomes": {
                        name: {
                            "expected": json_number(e.value),
                            "confidenceInterval": [json_number(e.low), json_number(e.high)],
                        }
                        for name, e in res.outcomes.items()
                    },
                },
                "timeseries": {"data": series["5/Expanding"]},
                "dloopTimeseries": series,
            }
        )
    return {
        "startTime": iso_time(start),
        "endTime": iso_time(end),
        "intervalInMinutes": 5,
        "value": value,
    }


def json_number(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else round(float(x), 6)
