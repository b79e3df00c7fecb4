"""Offline evaluation (learners.evaluation) on a simulated world whose policy values are known
exactly: every estimator covers the truth, IPS matches VW's own, and the content has
Personalizer's shape."""

from __future__ import annotations

import numpy as np
import pytest

from learners import vw
from learners.evaluation import PolicySpec, content, evaluate, read
from tests.support.sim import simulated_log


def test_every_estimator_covers_the_true_value_of_known_policies() -> None:
    lines, truth = simulated_log(6000)
    logged = read(lines)
    specs = [PolicySpec(name, name) for name in ("Online", "Baseline", "Random")]
    results = evaluate(logged, specs)
    for res in results:
        true = truth[res.spec.source]
        for name, est in res.estimates.items():
            assert est.low <= true <= est.high, (res.spec.source, name, est, true)
            assert est.high - est.low < 0.12, (res.spec.source, name, est)  # informative
    online = results[0].estimates["ips"]
    # On-policy: weights are 1, IPS is the plain average reward.
    assert online.value == pytest.approx(np.mean([d.reward for d in logged]))


def test_custom_policy_ips_matches_vowpal_wabbits_own_progressive_estimate() -> None:
    """An independent implementation: VW's progressive validation loss for --cb_explore_adf
    is the IPS estimate of its cost under the policy it had before each example."""
    lines, _ = simulated_log(3000)
    args = "--cb_explore_adf --epsilon 0.2 -q ::"
    results = evaluate(read(lines), [PolicySpec("eps", "Custom", args)])
    ws = vw.workspace(f"{args} --dsjson")
    for line in lines:
        vw.learn_line(ws, line)
    vw_cost = ws.get_sum_loss() / ws.get_weighted_examples()
    assert results[0].estimates["ips"].value == pytest.approx(-vw_cost, abs=1e-4)


def test_a_learning_policy_beats_random_and_the_content_has_personalizers_shape() -> None:
    lines, _ = simulated_log(6000)
    logged = read(lines)
    specs = [
        PolicySpec("Online", "Online"),
        PolicySpec("Random", "Random"),
        PolicySpec("squarecb", "Custom", "--cb_explore_adf --squarecb -q ::"),
    ]
    results = evaluate(logged, specs)
    assert results[2].estimates["dr"].low > results[1].estimates["dr"].high
    doc = content(results, start=logged[0].t, end=logged[-1].t + 1)
    assert [v["policySource"] for v in doc["value"]] == ["Online", "Random", "Custom"]
    summary = doc["value"][2]["summary"]
    assert set(summary) >= {"expectedReward", "confidenceInterval"}
    lo, hi = summary["confidenceInterval"]
    assert lo <= summary["expectedReward"] <= hi
    expanding = doc["value"][2]["timeseries"]["data"]
    assert len(expanding) == 20  # 6000 s of log in 5-minute intervals
    assert expanding[-1]["expectedReward"] == summary["expectedReward"]  # expanding window
    hourly = doc["value"][2]["dloopTimeseries"]["60/Rolling"]
    assert len(hourly) == 2 and hourly[0]["expectedReward"] != hourly[1]["expectedReward"]
