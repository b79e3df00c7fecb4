"""Named outcomes and the training reward made of them (issue 15).

Beside Personalizer's reward (the outcome named `reward`, range [-1, 1], the loop's
rewardAggregation), a loop may declare outcomes (`OutcomeRule`: a name, an aggregation and a
range), and a reward definition (learners.reward) turns an event's outcomes into the reward it
is trained on. `RewardRules` holds both, with the definition's version:

- `RewardRules.aggregate` combines the values of each outcome received in the join window (in
  arrival order) by that outcome's own aggregation;
- `RewardRules.reward` is the training reward of those outcomes: the definition's value (an
  outcome that never arrived takes its declared default, 0 unless declared otherwise;
  `reward` the loop's default reward), or without a definition the `reward` outcome; the
  loop's default when neither can be computed.

Joined lines keep the raw observations in `o` (a named one carries `"Outcome": name`), the
aggregated outcomes as `"Outcomes"` and the definition's version as `"RewardVersion"`: keys VW's
`--dsjson` parser ignores (tests/unit/learners/test_outcomes.py checks that it learns the same
model with and without them). `outcomes_of` reads them back (older lines, without `Outcomes`:
their reward, if one arrived), and `relabel` rewrites a line's costs under other rules: a
changed definition retrains on history, and offline jobs evaluate or train under any formula.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from learners.reward import NAME, NAME_RULE, Definition, MissingOutcome

REWARD = "reward"  # Personalizer's reward, an outcome like any other
REWARD_RANGE = (-1.0, 1.0)
MAX_OUTCOMES = 32

AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "earliest": lambda values: values[0],
    "sum": lambda values: float(sum(values)),
    "average": statistics.fmean,
    "min": min,
    "max": max,
    "median": statistics.median,
}


def aggregate(values: Sequence[float], how: str, default: float) -> float:
    """Combine an outcome's values (in arrival order) by `how`; `default` when there are
    none."""
    if not values:
        return default
    return float(AGGREGATIONS[how](values))


class OutcomeError(ValueError):
    """Outcome values a loop cannot take; the message says which and why."""


@dataclass(frozen=True)
class OutcomeRule:
    name: str
    aggregation: str
    low: float
    high: float
    # Its value for an event it never arrived for (None: none; a definition reading it then
    # gives the event the loop's default reward, unless it says coalesce(name, value)).
    default: float | None = 0.0


def _in_range(reward: float) -> float:
    low, high = REWARD_RANGE
    return min(high, max(low, reward))


@dataclass(frozen=True)
class RewardRules:
    """A loop's outcomes (`reward` included) and how they make the training reward."""

    default: float
    outcomes: Mapping[str, OutcomeRule] = field(default_factory=dict)
    definition: Definition | None = None
    version: int = 0

    @classmethod
    def personalizer(cls, default: float, aggregation: str) -> RewardRules:
        """Personalizer's rules: one outcome, `reward`, and it is the training reward."""
        return cls(default, {REWARD: OutcomeRule(REWARD, aggregation, *REWARD_RANGE, None)})

    @property
    def named(self) -> bool:
        """Whether the loop goes beyond Personalizer's reward (its lines then say so)."""
        return self.definition is not None or set(self.outcomes) != {REWARD}

    @property
    def tracked(self) -> frozenset[str]:
        """The outcomes an event is complete without (a join may end early once all arrived)."""
        if self.definition is None and not self.named:
            return frozenset({REWARD})
        names = set(self.outcomes) - {REWARD}
        if self.definition is not None and REWARD in self.definition.names:
            names.add(REWARD)
        return frozenset(names or {REWARD})

    def early(self) -> bool:
        """Whether an event can be complete before its window ends: every tracked outcome
        keeps its earliest value."""
        return all(self._rule(n).aggregation == "earliest" for n in self.tracked)

    def _rule(self, name: str) -> OutcomeRule:
        rule = self.outcomes.get(name)
        if rule is None:  # an outcome the loop no longer declares: kept raw, summed if needed
            return OutcomeRule(name, "earliest", -math.inf, math.inf, None)
        return rule

    def aggregate(self, values: Iterable[tuple[str, float]]) -> dict[str, float]:
        """Each outcome's values (name, value pairs in arrival order) combined by its rule."""
        by_name: dict[str, list[float]] = {}
        for name, value in values:
            by_name.setdefault(name, []).append(value)
        return {
            name: aggregate(vals, self._rule(name).aggregation, 0.0)
            for name, vals in by_name.items()
        }

    def value(self, outcomes: Mapping[str, float], name: str) -> float:
        """An outcome's value for an event (`outcomes`: those that arrived): its own, else its
        default (`reward`: the loop's default reward; none declared: 0), as the per-outcome
        figures (rollups, guardrails) count it."""
        if name in outcomes:
            return float(outcomes[name])
        if name == REWARD:
            return self.default
        rule = self.outcomes.get(name)
        return rule.default if rule is not None and rule.default is not None else 0.0

    def reward(self, outcomes: Mapping[str, float]) -> tuple[float, bool]:
        """The training reward of an event's aggregated outcomes, and whether any outcome it
        reads arrived (the event counts as rewarded). Outcomes that never arrived take their
        declared defaults; `reward` the loop's default reward. Clipped to the reward range:
        a definition is checked against each outcome's range, but an outcome summed over
        several calls, or sent under a range an admin has since narrowed, can leave it."""
        if self.definition is None:
            if REWARD in outcomes:
                return _in_range(float(outcomes[REWARD])), True
            return self.default, False
        rewarded = any(name in outcomes for name in self.definition.names)
        filled = {REWARD: self.default}
        for name, rule in self.outcomes.items():
            if rule.default is not None and name != REWARD:
                filled[name] = rule.default
        try:
            return _in_range(self.definition.evaluate({**filled, **outcomes})), rewarded
        except MissingOutcome:
            return self.default, rewarded

    def check(self, values: Mapping[str, Any]) -> dict[str, float]:
        """Outcome values an app sent, checked: OutcomeError names the first bad one."""
        if not isinstance(values, dict) or not values:
            raise OutcomeError('outcomes must be a non-empty object, e.g. {"click": 1}')
        if len(values) > MAX_OUTCOMES:
            raise OutcomeError(f"at most {MAX_OUTCOMES} outcomes in one call")
        out: dict[str, float] = {}
        for name, value in values.items():
            if not isinstance(name, str):  # (only an in-process caller can send one)
                raise OutcomeError(f"outcome names must be strings: {repr(name)[:80]}")
            if not NAME.match(name):
                raise OutcomeError(f"outcome names are {NAME_RULE}: {name[:80]!r}")
            rule = self.outcomes.get(name)
            if rule is None:
                known = ", ".join(sorted(self.outcomes))
                raise OutcomeError(
                    f"outcome {name!r} is not configured for this loop (configured: {known}); "
                    "declare it in the service configuration's outcomes"
                )
            ok = type(value) in (int, float) and math.isfinite(value)
            if not ok or not rule.low <= value <= rule.high:
                raise OutcomeError(
                    f"outcome {name!r} must be a finite number between {rule.low:g} and "
                    f"{rule.high:g}"
                )
            out[name] = float(value)
        return out


def outcomes_of(doc: Mapping[str, Any]) -> dict[str, float]:
    """The aggregated outcomes a joined CB line (or a CCB line's slot outcome) records; for a
    line written before outcomes were named, its reward if one arrived."""
    recorded = doc.get("Outcomes")
    if isinstance(recorded, dict):
        return {str(k): float(v) for k, v in recorded.items()}
    observations = doc.get("o") if "o" in doc else doc.get("_o")
    rewarded = any(isinstance(o, dict) and "v" in o for o in observations or ())
    if rewarded and "_original_label_cost" in doc:
        return {REWARD: -float(doc["_original_label_cost"])}
    return {}


def relabel(line: str | bytes, rules: RewardRules, *, apprentice: bool = False) -> bytes:
    """The joined line with its costs recomputed from its outcomes under `rules` (apprentice
    mode learns imitation: only the observed reward, `_original_label_cost`, changes)."""
    doc = orjson.loads(line)
    if "_outcomes" in doc:  # multi-slot: each slot on its own
        for slot in doc["_outcomes"]:
            _relabel(slot, rules, apprentice)
    else:
        _relabel(doc, rules, apprentice)
    doc["RewardVersion"] = rules.version
    return orjson.dumps(doc)


def relabel_lines(lines: Iterable[str], rules: RewardRules) -> Iterator[str]:
    """Logged lines labelled under `rules` (offline jobs: the reward they learn and evaluate
    is the observed one under the definition, never an apprentice's imitation)."""
    for line in lines:
        yield relabel(line, rules).decode()


def _relabel(doc: dict[str, Any], rules: RewardRules, apprentice: bool) -> None:
    reward, _ = rules.reward(outcomes_of(doc))
    if "_original_label_cost" in doc or "_label_cost" in doc:
        doc["_original_label_cost"] = -reward
    if "_label_cost" in doc and not apprentice:
        doc["_label_cost"] = -reward
