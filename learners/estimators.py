"""Off-policy value estimators for logged bandit data, with 95% confidence intervals.

Each logged decision i has a reward r_i, the logging policy's probability p_i of the action it
chose, the target policy's probability pi_i of that same action, and (for doubly robust) a
reward model's prediction for the chosen action, rhat_i, and its expectation under the target
policy, rhat_pi_i = sum_a pi(a|x_i) rhat(x_i, a). With w_i = pi_i / p_i:

    IPS   = mean(w_i r_i)
    SNIPS = sum(w_i r_i) / sum(w_i)
    DR    = mean(rhat_pi_i + w_i (r_i - rhat_i))

Intervals are normal approximations, estimate +- 1.96 standard errors, from the per-decision
terms (for SNIPS by the delta method: terms w_i (r_i - SNIPS) / mean(w)). They are honest for
the sample sizes offline evaluation needs (thousands of decisions) and say so by their width
when the weights are heavy; `effective_sample_size` is reported beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Values = Sequence[float] | npt.NDArray[np.float64]

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    @property
    def interval(self) -> list[float]:
        return [self.low, self.high]


def _interval(terms: np.ndarray, value: float) -> Estimate:
    n = len(terms)
    if n < 2:
        return Estimate(value, float("-inf"), float("inf"))
    se = float(np.std(terms, ddof=1) / np.sqrt(n))
    return Estimate(value, value - Z95 * se, value + Z95 * se)


def mean(terms: Values) -> Estimate:
    """The mean of per-decision (or per-episode) terms with its 95% interval; NaN if none."""
    t = np.asarray(terms, float)
    if len(t) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    return _interval(t, float(t.mean()))


def ips(rewards: Values, weights: Values) -> Estimate:
    return mean(np.asarray(weights, float) * np.asarray(rewards, float))


def snips(rewards: Values, weights: Values) -> Estimate:
    w = np.asarray(weights, float)
    r = np.asarray(rewards, float)
    if len(w) == 0 or w.sum() <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    value = float((w * r).sum() / w.sum())
    return _interval(w * (r - value) / w.mean(), value)


def dr_terms(
    rewards: Values, weights: Values, predicted_chosen: Values, predicted_target: Values
) -> npt.NDArray[np.float64]:
    """Per-decision doubly robust terms, rhat_pi_i + w_i (r_i - rhat_i)."""
    terms: npt.NDArray[np.float64] = np.asarray(predicted_target, float) + np.asarray(
        weights, float
    ) * (np.asarray(rewards, float) - np.asarray(predicted_chosen, float))
    return terms


def dr(
    rewards: Values,
    weights: Values,
    predicted_chosen: Values,
    predicted_target: Values,
) -> Estimate:
    return mean(dr_terms(rewards, weights, predicted_chosen, predicted_target))


def effective_sample_size(weights: Values) -> float:
    """(sum w)^2 / sum w^2: how many on-policy samples the weighted ones are worth."""
    w = np.asarray(weights, float)
    denom = float((w * w).sum())
    return float(w.sum() ** 2 / denom) if denom > 0 else 0.0
