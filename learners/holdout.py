"""Live holdout: which decisions a loop holds out, what its holdout policy serves, and how much
the online policy earns over it (uplift), with intervals.

A decision is held out by a hash of its holdout key (the rank request's `unitId`, sticky per
user or session, else its episode or event id), so the same key always lands on the same side
for the same share. The holdout policy serves the baseline action (the first eligible one) or
a uniformly random eligible one; the decision is logged with the probabilities it was really
drawn with, so it is valid data for learning and offline evaluation.

Uplift = mean reward of online decisions - mean reward of holdout decisions, over the decisions
made while a holdout was on. Two intervals:
- `interval95`: the usual two-sample (Welch) 95% interval of the difference of the means; valid
  when looked at once, at a horizon fixed in advance;
- `alwaysValid95`: a 95% asymptotic confidence sequence (Waudby-Smith, Arbour, Sinha, Kennedy
  and Ramdas, "Time-uniform central limit theory and asymptotic confidence sequences", 2024,
  the A/B-test construction): over the inverse-probability-weighted effect of each decision,
  psi = (y - c) / (1 - h) for an online decision and -(y - c) / h for a holdout one (h: the
  holdout share when it was decided; c: the loop's mean reward before it was joined, which
  leaves the mean unchanged and narrows the interval by about 30% on the test world), whose
  mean estimates the uplift even while the online policy learns (the target is the running
  average of the per-decision effects). It holds at every sample
  size at once, so a dashboard can watch it continuously: the chance that it ever excludes the
  true uplift is at most 5% (asymptotically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

from learners.sampling import sample, uniform_from_key

HOLDOUT_POLICIES = ("baseline", "random")
MIN_DECISIONS = 30  # per side, before an uplift is reported
HORIZON = 1000  # the sample size where the confidence sequence is tightest (its rho)


def in_holdout(loop: str, key: str, share: float) -> bool:
    """Whether the decision keyed `key` is held out when a share `share` is (0 to 0.5; up to
    0.95 while a guardrail falls back, learners.guardrails): the same keys stay held out as the
    share grows."""
    return share > 0 and uniform_from_key(f"{loop}/holdout/{key}") < share


def holdout_pmf(policy: str, eligible: Sequence[bool]) -> list[float]:
    """The holdout policy's probabilities: all on the first eligible action (`baseline`) or
    uniform over the eligible ones (`random`)."""
    if policy == "baseline":
        first = list(eligible).index(True)
        return [1.0 if i == first else 0.0 for i in range(len(eligible))]
    n = sum(eligible)
    return [1.0 / n if ok else 0.0 for ok in eligible]


def holdout_slots(
    policy: str,
    slot_ids: Sequence[str],
    allowed: Sequence[Sequence[int]],
    baselines: Sequence[int],
    seed: str,
) -> list[tuple[int, list[int], list[float]]]:
    """A held-out multi-slot decision, per slot (chosen action, the actions in the order
    served, their probabilities): each slot's baseline (`baseline`), or per slot in turn a
    uniform draw among its allowed actions that no earlier slot took (`random`; the same
    seeded draw as learners.ccb, keyed by the slot's id). A slot left without actions gets
    (-1, [], [])."""
    if policy == "baseline":
        return [(b, [b], [1.0]) for b in baselines]
    taken: set[int] = set()
    out: list[tuple[int, list[int], list[float]]] = []
    for slot, candidates_of in zip(slot_ids, allowed, strict=True):
        candidates = [a for a in candidates_of if a not in taken]
        if not candidates:
            out.append((-1, [], []))
            continue
        p = 1.0 / len(candidates)
        i = sample([p] * len(candidates), f"{seed}/{slot}")
        taken.add(candidates[i])
        order = [candidates[i]] + [a for j, a in enumerate(candidates) if j != i]
        out.append((candidates[i], order, [p] * len(candidates)))
    return out


def effect(reward: float, *, held_out: bool, share: float, center: float = 0.0) -> float:
    """A decision's inverse-probability-weighted effect psi (see the module's docstring);
    `center` (c) must not depend on this decision."""
    y = reward - center
    return -y / share if held_out else y / (1.0 - share)


@dataclass
class Moments:
    """Count, sum and sum of squares of a sample: its mean and variance, added up by rollups."""

    n: float = 0.0
    total: float = 0.0
    squares: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.squares += x * x

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """The sample variance (n - 1), 0 below two values."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))


@dataclass(frozen=True)
class Uplift:
    estimate: float
    interval95: tuple[float, float]
    always_valid95: tuple[float, float]


def z_value(alpha: float) -> float:
    """The two-sided normal quantile (1.96 for alpha 0.05)."""
    return NormalDist().inv_cdf(1 - alpha / 2)


def confidence_sequence(m: Moments, *, alpha: float = 0.05, horizon: int = HORIZON) -> float:
    """The half-width of the asymptotic confidence sequence for the mean of `m` (the paper's
    Gaussian-mixture boundary, rho tuned to be tightest at `horizon` samples)."""
    t = m.n
    if t < 2:
        return math.inf
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / horizon
    v = t * m.variance * rho2 + 1
    return math.sqrt(2 * v / (t * t * rho2) * math.log(math.sqrt(v) / alpha))


def uplift(
    online: Moments,
    holdout: Moments,
    effects: Moments,
    *,
    alpha: float = 0.05,
    minimum: int = MIN_DECISIONS,
) -> Uplift | None:
    """Online minus holdout mean reward with both intervals (module docstring); None until each
    side has `minimum` decisions. `effects` holds the psi of the same decisions."""
    if online.n < minimum or holdout.n < minimum:
        return None
    estimate = online.mean - holdout.mean
    half = z_value(alpha) * math.sqrt(online.variance / online.n + holdout.variance / holdout.n)
    cs = confidence_sequence(effects, alpha=alpha)
    return Uplift(
        estimate,
        (estimate - half, estimate + half),
        (effects.mean - cs, effects.mean + cs),
    )
