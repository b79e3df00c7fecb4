"""Counterfactual evaluation of policies on a loop's logged RL episodes: per-decision importance
sampling of discounted returns (each step's reward weighted by the product of the probability
ratios up to it), with the same policies as learners.evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from learners import estimators
from learners.evaluation import FIXED, Logged, PolicySpec, iso_time, json_number, read
from learners.rl import epsilon_greedy
from learners.sampling import restrict


@dataclass
class LoggedEpisode:
    steps: list[Logged]


def read_episodes(episodes: Iterable[list[str]]) -> list[LoggedEpisode]:
    """Episodes as lists of their joined lines in step order (as service.pipeline.episodes
    reads them from the database)."""
    out = []
    for lines in episodes:
        steps = read(lines)
        if steps:
            out.append(LoggedEpisode(steps))
    return out


@dataclass
class EpisodeResult:
    spec: PolicySpec
    returns: np.ndarray  # per episode: sum_t gamma^t rho_{0:t} r_t
    final_weights: np.ndarray  # per episode: rho over the whole episode
    estimate: estimators.Estimate
    effective_sample_size: float
    usable: bool


def evaluate_episodes(
    episodes: list[LoggedEpisode],
    policies: list[PolicySpec],
    *,
    gamma: float,
    greedy_values: Callable[[Logged], list[float]] | None = None,
    epsilon: float = 0.0,
) -> list[EpisodeResult]:
    """Per-decision importance sampling of the discounted return of each policy:

        V = mean over episodes of sum_t gamma^t * prod_{k <= t} pi(a_k|s_k) / mu(a_k|s_k) * r_t

    Online is the logging policy (weights 1: the observed discounted return); Baseline and
    Random as for bandits; "Greedy" is epsilon-greedy on `greedy_values` (the loop's current Q
    model). Products of ratios grow fast with episode length, so an estimate whose effective
    sample size (of the whole-episode weights) is under 10% of the episodes, or under 10
    episodes, is marked unusable rather than reported as if it were informative.
    """

    def greedy(d: Logged) -> list[float]:
        assert greedy_values is not None
        values = greedy_values(d)
        costs = [-v if ok else float("inf") for v, ok in zip(values, d.eligible, strict=True)]
        return restrict(epsilon_greedy(costs, epsilon), d.eligible)

    results = []
    for spec in policies:
        score = FIXED.get(spec.source) or greedy
        per_episode, finals = [], []
        for ep in episodes:
            rho, total = 1.0, 0.0
            for t, d in enumerate(ep.steps):
                rho *= score(d)[d.chosen] / d.p
                total += gamma**t * rho * d.reward
            per_episode.append(total)
            finals.append(rho)
        returns = np.array(per_episode)
        est = estimators.mean(returns)
        ess = estimators.effective_sample_size(np.array(finals))
        usable = ess >= max(10.0, 0.1 * len(episodes))
        results.append(EpisodeResult(spec, returns, np.array(finals), est, ess, usable))
    return results


def episode_content(results: list[EpisodeResult], *, start: float, end: float) -> dict[str, Any]:
    """The EvaluationResult shape for RL loops: expected discounted return per episode."""
    value = []
    for r in results:
        summary: dict[str, Any] = {
            "expectedReward": json_number(r.estimate.value),
            "confidenceInterval": [json_number(r.estimate.low), json_number(r.estimate.high)],
            "estimator": "PerDecisionIS",
            "episodes": len(r.returns),
            "effectiveSampleSize": json_number(r.effective_sample_size),
            "usable": r.usable,
        }
        if not r.usable:
            summary["warning"] = (
                "importance weights over whole episodes are too uneven for this estimate to "
                "mean anything (effective sample size "
                f"{r.effective_sample_size:.1f} of {len(r.returns)} episodes)"
            )
        value.append(
            {
                "name": r.spec.name,
                "arguments": r.spec.arguments,
                "slotId": "",
                "policySource": r.spec.source,
                "summary": summary,
                "timeseries": {"data": []},
            }
        )
    return {
        "startTime": iso_time(start),
        "endTime": iso_time(end),
        "intervalInMinutes": 5,
        "value": value,
    }
