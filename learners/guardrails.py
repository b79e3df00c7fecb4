"""Guardrails (issue 15): an outcome that the loop's policy must not push the wrong way by more
than a tolerated share, checked as events join with the always-valid intervals of the live
holdout (learners.holdout), so a breach is a statistically supported one at any moment it is
looked at.

A guardrail names an outcome (learners.outcomes), the change it must not make (`increase` or
`decrease`), a tolerance relative to its comparator and an action (`alert`, or `fallback`: serve
the holdout policy until it recovers). With k = 1 + tolerance (increase) or 1 - tolerance
(decrease), each joined decision gives a term psi whose mean is m_policy - k * m_comparator:

- live (the window holds held-out decisions on both sides): psi = Y 1[online] / (1 - h) -
  k Y 1[held] / h, with h the decision's holdout share: an inverse-probability-weighted
  difference of the online and the holdout policies' means;
- otherwise, against the baseline's counterfactual value: psi = Y - k w Y, with w = 1[chosen
  is the baseline] / p(chosen): the served policy's mean minus k times the baseline's by
  inverse propensity scoring from the logged probabilities.

Every term is a sum the joiner keeps per 10 seconds (`SUMS`, rollups of OutcomeStat), so psi's
mean and variance follow for any k, and the confidence sequence over the window says whether
mean psi is above 0 (an increase past the tolerance), below it, or neither yet. A guardrail is
`breached` when the whole interval is on the wrong side, and `recovered` once, in a window
started at the breach, the whole interval is on the right side.

While a fallback is on, `FALLBACK_PROBE` of decisions are still served by the model and the rest
by the holdout policy, so whether it has recovered stays measurable while it keeps learning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from learners.holdout import MIN_DECISIONS, Moments, confidence_sequence

DIRECTIONS = ("increase", "decrease")
ACTIONS = ("alert", "fallback")
FALLBACK_PROBE = 0.05  # the share of decisions the model still serves during a fallback
MAX_GUARDRAILS = 8

# The sums one joined decision adds for an outcome (OutcomeStat's columns).
SUMS = (
    "n",
    "y_sum",
    "y_sq",
    "holdout_n",
    "holdout_sum",
    "trial_n",
    "trial_sum",
    "ht_a",
    "ht_a2",
    "ht_b",
    "ht_b2",
    "bw_y",
    "bw_y2",
    "y_bw_y",
)


@dataclass(frozen=True)
class Guardrail:
    outcome: str
    must_not: str  # increase | decrease
    tolerance: float  # relative to the comparator's mean
    action: str = "alert"

    @property
    def key(self) -> str:
        return f"{self.outcome}:{self.must_not}"

    @property
    def k(self) -> float:
        return 1 + self.tolerance if self.must_not == "increase" else 1 - self.tolerance


def sums(
    y: float,
    *,
    share: float,
    held: bool,
    ranking: Sequence[int],
    probabilities: Sequence[float],
    baseline: int,
) -> dict[str, float]:
    """What one joined, learnable decision adds for an outcome of value `y` (`share`, `held`:
    its holdout share and side; `ranking`/`probabilities`/`baseline` as logged, for the
    baseline's counterfactual: w = 1[chosen is the baseline] / p)."""
    out = dict.fromkeys(SUMS, 0.0)
    out.update(n=1.0, y_sum=y, y_sq=y * y)
    if share > 0:
        if held:
            b = y / share
            out.update(holdout_n=1.0, holdout_sum=y, ht_b=b, ht_b2=b * b)
        else:
            a = y / (1 - share)
            out.update(trial_n=1.0, trial_sum=y, ht_a=a, ht_a2=a * a)
    if ranking and probabilities[0] > 0:
        wy = (1.0 if ranking[0] == baseline else 0.0) / probabilities[0] * y
        out.update(bw_y=wy, bw_y2=wy * wy, y_bw_y=y * wy)
    return out


@dataclass(frozen=True)
class Verdict:
    status: str  # breached | safe | unknown (not enough evidence either way)
    comparator: str  # holdout | baseline
    policy_mean: float  # the outcome's mean under the loop's policy ...
    comparator_mean: float  # ... and under the comparator
    effect: float  # mean psi: policy - k * comparator
    interval: tuple[float, float]  # its always-valid 95% interval
    decisions: int


def check(g: Guardrail, s: Mapping[str, float], *, alpha: float = 0.05) -> Verdict:
    """Where the guardrail stands on a window's sums (module docstring)."""
    live = s.get("holdout_n", 0.0) >= MIN_DECISIONS and s.get("trial_n", 0.0) >= MIN_DECISIONS
    n = s.get("n", 0.0)
    k = g.k
    if live:
        total = s["ht_a"] - k * s["ht_b"]
        squares = s["ht_a2"] + k * k * s["ht_b2"]
        policy, comparator = s["trial_sum"] / s["trial_n"], s["holdout_sum"] / s["holdout_n"]
    else:
        total = s.get("y_sum", 0.0) - k * s.get("bw_y", 0.0)
        squares = s.get("y_sq", 0.0) - 2 * k * s.get("y_bw_y", 0.0) + k * k * s.get("bw_y2", 0.0)
        policy = s.get("y_sum", 0.0) / n if n else 0.0
        comparator = s.get("bw_y", 0.0) / n if n else 0.0
    m = Moments(n, total, squares)
    radius = confidence_sequence(m, alpha=alpha) if n >= MIN_DECISIONS else float("inf")
    low, high = m.mean - radius, m.mean + radius
    wrong_side = low > 0 if g.must_not == "increase" else high < 0
    right_side = high < 0 if g.must_not == "increase" else low > 0
    status = "breached" if wrong_side else "safe" if right_side else "unknown"
    return Verdict(
        status,
        "holdout" if live else "baseline",
        policy,
        comparator,
        m.mean,
        (low, high),
        int(n),
    )
