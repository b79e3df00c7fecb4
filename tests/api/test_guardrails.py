"""Guardrails through the API (issue 15) on a simulated shop where the objective (clicks) and a
guardrail (unsubscribes must not rise by more than half over the holdout's) conflict: the
model learns clickbait, the breach is detected within a stated number of decisions with the
always-valid interval, shows on GET .../guardrails, /metrics and the log, and the fallback serves
the holdout policy (the baseline) to all but a probe of decisions, holding unsubscribes near the
baseline's level."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from learners.guardrails import FALLBACK_PROBE
from learners.sim.worlds import ShopWorld
from tests.support.harness import AUTH, Harness

OUTCOMES = [
    {"name": "click", "aggregation": "max", "min": 0, "max": 1},
    {"name": "purchase", "aggregation": "sum", "min": 0, "max": 500},
    {"name": "unsubscribe", "min": 0, "max": 1},
]
ORDER = ("digest", "deal", "premium", "clickbait")  # the baseline: the digest
GUARD = {"outcome": "unsubscribe", "mustNot": "increase", "tolerance": 0.5, "action": "fallback"}


def _run(h: Harness, world: ShopWorld, start: int, n: int, served: list[dict[str, Any]]) -> None:
    actions = world.actions(ORDER)
    for i in range(start, start + n):
        segment, context = world.draw_context()
        out = h.rank(
            {"eventId": f"e{i}", "contextFeatures": context, "actions": actions, "unitId": f"u{i}"}
        )
        offer = world.offers.index(out["rewardActionId"])
        drawn = world.outcomes(segment, offer)
        r = h.client.post(
            f"/personalizer/v1.0/events/e{i}/outcomes", json={"outcomes": drawn}, headers=AUTH
        )
        assert r.status_code == 204, r.text
        served.append(
            {
                "i": i,
                "held": bool(out.get("holdout")),
                "unsubscribe": world.expected(segment, offer)["unsubscribe"],
            }
        )
        if i % 50 == 49:
            h.clock.advance(11)
            h.work()


def _guardrails(h: Harness) -> dict[str, Any]:
    r = h.client.get("/loops/default/guardrails", headers=AUTH)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


@pytest.mark.slow
def test_a_guardrail_breach_is_detected_and_the_fallback_holds_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    world = ShopWorld(seed=5)
    harness.configure(
        outcomes=OUTCOMES,
        rewardDefinition="click",
        rewardWaitTime="PT10S",
        holdoutPercentage=10,
        guardrails=[GUARD],
    )
    served: list[dict[str, Any]] = []
    breached_at = None
    with caplog.at_level(logging.WARNING, logger="dloop.guardrails"):
        for block in range(40):
            _run(harness, world, block * 100, 100, served)
            doc = _guardrails(harness)
            if doc["fallback"]:
                breached_at = (block + 1) * 100
                break
    assert breached_at is not None, doc
    g = doc["guardrails"][0]
    assert g["state"] == "breached"
    assert g["comparator"] == "holdout"
    assert doc["holdoutShare"] == pytest.approx(1 - FALLBACK_PROBE)
    # The interval was wholly above the tolerated level when it was judged.
    assert g["excess"] > 0
    assert any("guardrail unsubscribe:increase breached" in m for m in caplog.messages)
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert re.search(
        r'dloop_guardrail_breached\{loop="default",guardrail="unsubscribe:increase"\} 1', metrics
    )
    assert 'dloop_fallback{loop="default"} 1' in metrics
    before = [s["unsubscribe"] for s in served if not s["held"]][-200:]
    # In fallback the holdout policy serves all but the probe.
    fallback: list[dict[str, Any]] = []
    _run(harness, world, breached_at, 1000, fallback)
    held = sum(s["held"] for s in fallback) / len(fallback)
    assert held == pytest.approx(1 - FALLBACK_PROBE, abs=0.02)
    digest = world.offers.index(ORDER[0])
    baseline = sum(world.expected(s, digest)["unsubscribe"] for s in range(3)) / 3
    model_level = sum(before) / len(before)
    level = sum(s["unsubscribe"] for s in fallback) / len(fallback)
    online = [s for s in served if not s["held"]]
    bad_from = next(
        online[k]["i"]
        for k in range(100, len(online))
        if sum(s["unsubscribe"] for s in online[k - 100 : k]) / 100 > 1.5 * baseline
    )
    print(
        f"\nthe model's unsubscribes passed the tolerance by decision {bad_from}; "
        f"breach detected after {breached_at} decisions; unsubscribe rate (expected): "
        f"model {model_level:.4f}, baseline {baseline:.4f}, during fallback {level:.4f}"
    )
    assert model_level > 3 * baseline
    assert level < baseline + 2 * FALLBACK_PROBE * (model_level - baseline)
    assert _guardrails(harness)["fallback"]  # the model still wants clickbait: no recovery


def test_bad_guardrails_are_a_400(harness: Harness) -> None:
    cfg = harness.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
    for guard, message in (
        ({**GUARD, "outcome": "views"}, "guardrails.0.outcome: 'views' is not an outcome"),
        ({**GUARD, "mustNot": "wobble"}, "guardrails.0.mustNot"),
        ({**GUARD, "tolerance": -1}, "guardrails.0.tolerance"),
        ({**GUARD, "action": "panic"}, "guardrails.0.action"),
    ):
        r = harness.client.put(
            "/personalizer/v1.0/configurations/service",
            json={**cfg, "outcomes": OUTCOMES, "guardrails": [guard]},
            headers=AUTH,
        )
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"], r.text
    r = harness.client.put(
        "/personalizer/v1.0/configurations/service",
        json={**cfg, "outcomes": OUTCOMES, "guardrails": [GUARD, GUARD]},
        headers=AUTH,
    )
    assert "one per outcome and direction" in r.json()["error"]["message"]
    r = harness.client.put(
        "/personalizer/v1.0/configurations/service",
        json={**cfg, "outcomes": OUTCOMES, "guardrails": [GUARD], "learningMode": "Apprentice"},
        headers=AUTH,
    )
    assert "a fallback needs learningMode Online" in r.json()["error"]["message"]


def test_a_guardrail_against_the_baseline_s_counterfactual(harness: Harness) -> None:
    """Without a holdout the comparator is the baseline's counterfactual value from the
    logged probabilities; an alert does not fall back."""
    world = ShopWorld(seed=6)
    harness.configure(
        outcomes=OUTCOMES,
        rewardDefinition="click",
        rewardWaitTime="PT10S",
        explorationPercentage=0.5,
        guardrails=[{**GUARD, "action": "alert"}],
    )
    served: list[dict[str, Any]] = []
    for block in range(30):
        _run(harness, world, block * 100, 100, served)
        doc = _guardrails(harness)
        if doc["guardrails"][0]["state"] == "breached":
            break
    g = doc["guardrails"][0]
    assert g["state"] == "breached", doc
    assert g["comparator"] == "baseline"
    assert not doc["fallback"]
    assert not any(s["held"] for s in served)
