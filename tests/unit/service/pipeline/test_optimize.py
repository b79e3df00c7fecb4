"""Auto-optimisation (service.pipeline.optimize): a searched policy is applied only when it is
clearly better than the online one, on a simulated world and by the rule itself."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness


@pytest.mark.slow
def test_auto_optimization_applies_a_policy_only_when_it_is_clearly_better(
    harness: Harness,
) -> None:
    from learners.sim.worlds import CBWorld
    from service.pipeline.optimize import auto_choice, auto_optimize

    world = CBWorld(n_actions=4, seed=9)
    # A poor online policy: explores uniformly for ever.
    r = harness.client.put(
        "/personalizer/v1.0/configurations/policy",
        json={"name": "uniform", "arguments": "--cb_explore_adf --epsilon 1"},
        headers=AUTH,
    )
    assert r.status_code == 200
    harness.configure(rewardWaitTime="PT5S")
    for i in range(1200):
        values, features = world.draw_context()
        ranked = harness.rank(
            {"contextFeatures": features, "actions": world.actions(), "eventId": f"o{i}"}
        )
        chosen = world.action_ids.index(ranked["rewardActionId"])
        harness.reward(f"o{i}", world.reward(values, chosen))
    harness.clock.advance(10)
    harness.work()
    d = harness.dloop
    assert auto_optimize(d.control, "default") is None  # not enabled
    harness.configure(isAutoOptimizationEnabled=True, autoOptimizationFrequency="P1D")
    evaluation_id = auto_optimize(d.control, "default")
    assert evaluation_id is not None
    assert auto_optimize(d.control, "default") is None  # once per period
    doc = harness.client.get(f"/personalizer/v1.0/evaluations/{evaluation_id}", headers=AUTH)
    ev = doc.json()
    assert ev["evaluationType"] == "Auto" and ev["status"] == "OptimalPolicyApplied", ev
    policy = harness.client.get("/personalizer/v1.0/configurations/policy", headers=AUTH).json()
    assert policy["name"] == ev["optimalPolicy"] and "--epsilon 1" not in policy["arguments"]
    # Now the online policy is that one: a new period keeps it unless something beats it.
    harness.clock.advance(86400)
    second = auto_optimize(d.control, "default")
    doc = harness.client.get(f"/personalizer/v1.0/evaluations/{second}", headers=AUTH)
    ev = doc.json()
    # Either outcome can be right here; the one taken is the rule's on this evaluation's results
    # (each outcome of the rule: test_auto_optimization_rule).
    best, better = auto_choice(ev["content"]["value"])
    assert ev["status"] == ("OptimalPolicyApplied" if better else "OnlinePolicyRetained"), ev
    assert ev["optimalPolicy"] == best["name"]
    now = harness.client.get("/personalizer/v1.0/configurations/policy", headers=AUTH).json()
    assert now["name"] == (best["name"] if better else policy["name"])


def test_auto_optimization_keeps_the_online_policy_on_a_lucky_estimate(harness: Harness) -> None:
    """On 30 events a searched policy's estimate beats the online one, but not its lower bound:
    the online policy stays."""
    from service.pipeline.optimize import auto_optimize

    harness.configure(rewardWaitTime="PT5S")
    for i in range(30):
        harness.rank(rank_body(f"p{i}"))
        harness.reward(f"p{i}", 1.0 if i % 2 else 0.0)
    harness.clock.advance(10)
    harness.work()
    harness.configure(isAutoOptimizationEnabled=True, autoOptimizationFrequency="P1D")
    evaluation_id = auto_optimize(harness.dloop.control, "default")
    doc = harness.client.get(f"/personalizer/v1.0/evaluations/{evaluation_id}", headers=AUTH)
    ev = doc.json()
    by_name = {v["name"]: v["summary"] for v in ev["content"]["value"]}
    online, best = by_name["dloop-default"], by_name[ev["optimalPolicy"]]
    assert best["expectedReward"] > online["expectedReward"] >= best["confidenceInterval"][0]
    assert ev["status"] == "OnlinePolicyRetained", ev
    policy = harness.client.get("/personalizer/v1.0/configurations/policy", headers=AUTH).json()
    assert policy["name"] == "dloop-default"


def summary(source: str, name: str, estimate: float | None, low: float | None) -> dict[str, Any]:
    high = None if estimate is None or low is None else 2 * estimate - low
    return {
        "name": name,
        "arguments": f"--cb_explore_adf # {name}",
        "policySource": source,
        "summary": {"expectedReward": estimate, "confidenceInterval": [low, high]},
    }


@pytest.mark.parametrize(
    ("online", "searched", "best", "apply"),
    [
        # The online policy is better: kept.
        (0.6, [("a", 0.5, 0.45), ("b", 0.55, 0.4)], "a", False),
        # A searched policy's estimate is better but its lower bound is not: kept.
        (0.5, [("a", 0.6, 0.45)], "a", False),
        # Clearly better (estimate and lower bound above the online estimate): applied.
        (0.4, [("a", 0.6, 0.5)], "a", True),
        # The best is the highest lower bound, not the highest estimate.
        (0.5, [("lucky", 0.9, 0.3), ("steady", 0.6, 0.55)], "steady", True),
        (0.5, [("lucky", 0.9, 0.3), ("steady", 0.6, 0.45)], "steady", False),
        # No estimate (no data in the window) applies nothing.
        (None, [("a", 0.6, 0.5)], "a", False),
        (0.4, [("a", None, None)], "a", False),
    ],
    ids=[
        "online-better",
        "estimate-better-bound-not",
        "clearly-better",
        "highest-bound-applied",
        "highest-bound-kept",
        "no-online-estimate",
        "no-candidate-estimate",
    ],
)
def test_auto_optimization_rule(
    online: float | None,
    searched: list[tuple[str, float | None, float | None]],
    best: str,
    apply: bool,
) -> None:
    from service.pipeline.optimize import auto_choice

    results = [
        summary("Online", "online", online, None if online is None else online - 0.01),
        # Only searched policies are candidates, however good the others look.
        summary("Baseline", "Baseline", 0.99, 0.98),
        summary("Random", "Random", 0.99, 0.98),
        summary("Custom", "mine", 0.99, 0.98),
        *(summary("OfflineExperimentation", *s) for s in searched),
    ]
    chosen, better = auto_choice(results)
    assert (chosen["name"], better) == (best, apply)
