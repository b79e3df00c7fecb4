"""learners.constraints: the exploration limit and exposure caps change the probabilities a
decision is drawn with; estimates from the probabilities actually used stay unbiased on a world
with known values (and would not be from the policy's own)."""

from __future__ import annotations

import numpy as np
import pytest

from learners import estimators
from learners.constraints import Cap, ExposureCaps, cap, limit_exploration
from learners.sampling import sample
from learners.sim.worlds import CBWorld


def test_limit_exploration_moves_mass_to_the_top_action() -> None:
    assert limit_exploration([0.5, 0.3, 0.2], 0.2) == pytest.approx([0.8, 0.12, 0.08])
    assert limit_exploration([0.1, 0.85, 0.05], 0.2) == [0.1, 0.85, 0.05]  # already within
    assert limit_exploration([0.25, 0.25, 0.5, 0.0], 0.0) == [0.0, 0.0, 1.0, 0.0]


def test_cap_spreads_the_excess_over_the_other_eligible_actions() -> None:
    out = cap([0.7, 0.2, 0.1, 0.0], [True, True, True, False], {0: 0.3})
    assert out == pytest.approx([0.3, 0.2 + 0.4 * 2 / 3, 0.1 + 0.4 / 3, 0.0])
    # Others without probability share the excess evenly; an excluded one gets none.
    assert cap([1.0, 0.0, 0.0], [True, True, False], {0: 0.2}) == pytest.approx([0.2, 0.8, 0.0])
    assert cap([1.0, 0.0], [True, True], {0: 0.5, 1: 0.5}) == [1.0, 0.0]  # nowhere to go


def test_exposure_caps_count_a_sliding_window() -> None:
    caps = ExposureCaps([Cap("a", 0.5, 60.0)])
    for t in range(10):
        caps.record("a" if t < 6 else "b", float(t))
    assert caps.shares(10.0) == {"a": 0.6}
    assert caps.limits(["b", "a"], 10.0) == {1: 0.5}
    assert caps.limits(["b", "a"], 200.0) == {}  # the window moved on
    assert caps.shares(200.0) == {"a": 0.0}


def test_capped_serving_keeps_the_share_near_the_cap() -> None:
    caps = ExposureCaps([Cap("a0", 0.25, 100.0)])
    served = []
    for i in range(4000):
        t = i * 0.1
        pmf = cap([0.9, 0.05, 0.05], [True] * 3, caps.limits(["a0", "a1", "a2"], t))
        chosen = sample(pmf, f"seed/{i}")
        caps.record(f"a{chosen}", t)
        served.append(chosen)
    assert np.mean(np.array(served[1000:]) == 0) == pytest.approx(0.25, abs=0.03)


def test_estimates_from_the_used_probabilities_stay_unbiased() -> None:
    """A policy that wants action 0 (90%), an exploration limit of 30% and a cap of 40% on
    action 0: the uniform policy's and 'always action 3''s values, estimated by inverse
    propensity from the logged (used) probabilities, hold the true values in their intervals;
    from the policy's own probabilities they would be far off."""
    world = CBWorld(n_actions=4, seed=11)
    caps = ExposureCaps([Cap("a0", 0.4, 50.0)])
    rng = np.random.default_rng(5)
    rows = []
    for i in range(20_000):
        values, _ = world.draw_context()
        wanted = [0.9, 0.04, 0.03, 0.03]
        used = limit_exploration(wanted, 0.3)
        used = cap(used, [True] * 4, caps.limits(world.action_ids, i * 0.01))
        a = int(rng.choice(4, p=np.array(used) / sum(used)))
        caps.record(world.action_ids[a], i * 0.01)
        mu = world.expected(values)
        rows.append((a, used[a], wanted[a], float(rng.random() < mu[a]), mu))
    for target, truth_of in (
        (lambda a: 0.25, lambda mu: float(mu.mean())),
        (lambda a: float(a == 3), lambda mu: float(mu[3])),
    ):
        r = np.array([x[3] for x in rows])
        truth = float(np.mean([truth_of(x[4]) for x in rows]))
        used_w = np.array([target(x[0]) / x[1] for x in rows])
        wanted_w = np.array([target(x[0]) / x[2] for x in rows])
        good = estimators.ips(r, used_w)
        bad = estimators.ips(r, wanted_w)
        assert good.low <= truth <= good.high, (good, truth)
        assert not bad.low <= truth <= bad.high, (bad, truth)
