"""What one joined decision adds to its loop's rollups: the sums behind every number of the
dashboard and `GET /loops/{loop}/stats`, kept per 10 seconds as the joiner joins, so statistics
never scan raw decisions.

Every quantity is a sum, so buckets add up to any coarser bucket, and means, variances,
intervals and effective sample sizes are computed from them at query time (service layer):
- `decisions` joined and `learnable` ones (a deferred decision never activated was not shown:
  it counts as joined, not in any reward figure), `rewarded` (a reward arrived in the window)
  and `explored` (the chosen action was not the policy's most probable one);
- reward moments (`reward_*`) of learnable decisions; of the held-out ones (`holdout_*`) and
  of the online ones taken while a holdout was on (`trial_*`), and the effect psi of both
  (`effect_*`, learners.holdout) for the always-valid uplift;
- counterfactual values of the baseline and of the uniformly random policy on the same
  decisions, by inverse propensity scoring from the logged probabilities: sums of the weights
  w = pi(chosen) / p(chosen), of w^2 (effective sample size (sum w)^2 / sum w^2) and of w*r
  and (w*r)^2 (estimate and interval). "Random" is uniform over the actions the logging
  policy could choose (probability above 0): without exploration (LoggingOnly) it is the
  baseline's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from learners.holdout import effect

FIELDS = (
    "decisions",
    "learnable",
    "rewarded",
    "explored",
    "reward_n",
    "reward_sum",
    "reward_sq",
    "holdout_n",
    "holdout_sum",
    "holdout_sq",
    "trial_n",
    "trial_sum",
    "trial_sq",
    "effect_n",
    "effect_sum",
    "effect_sq",
    "baseline_w",
    "baseline_w2",
    "baseline_wr",
    "baseline_wr2",
    "random_w",
    "random_w2",
    "random_wr",
    "random_wr2",
)


def increments(
    *,
    ranking: Sequence[int],
    probabilities: Sequence[float],
    baseline: int,
    reward: float,
    rewarded: bool,
    learnable: bool,
    share: float = 0.0,
    held: bool = False,
    center: float = 0.0,
) -> dict[str, float]:
    """The sums one joined decision (or one slot of a multi-slot decision) adds. `ranking`
    and `probabilities` are as logged (chosen first); `share`/`held`: the holdout share when
    it was decided and whether it was held out; `center`: the loop's mean reward before this
    join (learners.holdout.effect)."""
    out = outcome(
        reward=reward,
        rewarded=rewarded,
        learnable=learnable and bool(ranking),
        share=share,
        held=held,
        center=center,
    )
    if not out["learnable"]:
        return out
    chosen, p = ranking[0], probabilities[0]
    out["explored"] = float(p < max(probabilities))
    if p > 0:
        possible = sum(1 for q in probabilities if q > 0)
        for name, target in (
            ("baseline", 1.0 if chosen == baseline else 0.0),
            ("random", 1.0 / possible),
        ):
            w = target / p
            out[f"{name}_w"] = w
            out[f"{name}_w2"] = w * w
            out[f"{name}_wr"] = w * reward
            out[f"{name}_wr2"] = (w * reward) ** 2
    return out


def outcome(
    *,
    reward: float,
    rewarded: bool,
    learnable: bool,
    share: float = 0.0,
    held: bool = False,
    center: float = 0.0,
) -> dict[str, float]:
    """The sums of a joined decision that do not depend on its actions (a multi-slot
    decision's whole: its reward is the slots' mean)."""
    out = dict.fromkeys(FIELDS, 0.0)
    out["decisions"] = 1
    if not learnable:
        return out
    out["learnable"] = 1
    out["rewarded"] = float(rewarded)
    _moments(out, "reward", reward)
    if share > 0:
        _moments(out, "holdout" if held else "trial", reward)
        _moments(out, "effect", effect(reward, held_out=held, share=share, center=center))
    return out


def _moments(out: dict[str, float], name: str, x: float) -> None:
    out[f"{name}_n"] = 1
    out[f"{name}_sum"] = x
    out[f"{name}_sq"] = x * x


def add(total: dict[str, float], more: Mapping[str, float]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v
