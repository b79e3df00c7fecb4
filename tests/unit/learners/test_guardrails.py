"""learners.guardrails on simulated decisions with known means: a real breach is found (against
the live holdout and against the baseline's counterfactual value), an A/A comparison is not
flagged however often it is looked at, the tolerance moves the line, and a policy safely below
the line is judged safe (a recovery)."""

from __future__ import annotations

import numpy as np
import pytest

from learners import rollups
from learners.guardrails import Guardrail, check, sums

INCREASE = Guardrail("unsubscribe", "increase", 0.5, "fallback")


def _holdout_run(
    seed: int, n: int, policy: float, holdout: float, share: float = 0.1, every: int = 100
) -> list[str]:
    """Decisions with a Bernoulli outcome (mean `policy` online, `holdout` held out), checked
    every `every` decisions; the statuses seen."""
    rng = np.random.default_rng(seed)
    total: dict[str, float] = {}
    seen = []
    for i in range(n):
        held = bool(rng.random() < share)
        y = float(rng.random() < (holdout if held else policy))
        rollups.add(
            total, sums(y, share=share, held=held, ranking=[0], probabilities=[1.0], baseline=0)
        )
        if i % every == every - 1:
            seen.append(check(INCREASE, total).status)
    return seen


def test_a_real_increase_is_a_breach_within_a_few_thousand_decisions() -> None:
    firsts = []
    for seed in range(10):
        seen = _holdout_run(seed, 5000, policy=0.10, holdout=0.02)
        assert "breached" in seen
        firsts.append((seen.index("breached") + 1) * 100)
    assert max(firsts) <= 2500, firsts  # policy 5x the holdout, 10% held out (median 550)


def test_an_aa_comparison_is_never_flagged_however_often_it_is_looked_at() -> None:
    """Equal means and no tolerance, checked every 50 decisions for 5,000: the always-valid
    interval keeps the chance of ever flagging below 5%."""
    aa = Guardrail("unsubscribe", "increase", 0.0)
    flagged = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        total: dict[str, float] = {}
        for i in range(5000):
            held = bool(rng.random() < 0.2)
            y = float(rng.random() < 0.1)
            rollups.add(
                total, sums(y, share=0.2, held=held, ranking=[0], probabilities=[1.0], baseline=0)
            )
            if i % 50 == 49 and check(aa, total).status == "breached":
                flagged += 1
                break
    assert flagged <= 2  # 5% of 40


def test_the_tolerance_moves_the_line() -> None:
    """A 30% increase breaches a 10% tolerance and not a 100% one (which it is safely under)."""
    tight = Guardrail("unsubscribe", "increase", 0.1)
    loose = Guardrail("unsubscribe", "increase", 1.0)
    rng = np.random.default_rng(1)
    total: dict[str, float] = {}
    for _ in range(60_000):
        held = bool(rng.random() < 0.5)
        y = float(rng.random() < (0.10 if held else 0.13))
        rollups.add(
            total, sums(y, share=0.5, held=held, ranking=[0], probabilities=[1.0], baseline=0)
        )
    assert check(tight, total).status == "breached"
    verdict = check(loose, total)
    assert verdict.status == "safe"  # a recovery, for a guardrail that was breached
    assert verdict.comparator == "holdout"
    assert verdict.policy_mean == pytest.approx(0.13, abs=0.01)
    assert verdict.comparator_mean == pytest.approx(0.10, abs=0.01)


def test_without_a_holdout_the_baseline_s_counterfactual_value_is_the_comparator() -> None:
    """Uniform logging over 4 actions, the baseline (action 0) has outcome mean 0.02 and the
    others 0.2: the served policy's mean (0.155) is far above the baseline's, found by inverse
    propensity weights; a decrease guardrail on the same numbers is safe."""
    rng = np.random.default_rng(3)
    total: dict[str, float] = {}
    for _ in range(4000):
        a = int(rng.integers(4))
        y = float(rng.random() < (0.02 if a == 0 else 0.2))
        rollups.add(
            total,
            sums(y, share=0.0, held=False, ranking=[a], probabilities=[0.25], baseline=0),
        )
    verdict = check(INCREASE, total)
    assert verdict.status == "breached"
    assert verdict.comparator == "baseline"
    assert verdict.comparator_mean == pytest.approx(0.02, abs=0.015)
    assert verdict.policy_mean == pytest.approx(0.155, abs=0.02)
    assert check(Guardrail("unsubscribe", "decrease", 0.0), total).status == "safe"


def test_too_few_decisions_say_nothing() -> None:
    total: dict[str, float] = {}
    for _ in range(10):
        rollups.add(
            total, sums(1.0, share=0.0, held=False, ranking=[0], probabilities=[0.5], baseline=1)
        )
    assert check(INCREASE, total).status == "unknown"
