"""The service configuration's limits: day counts and outcome ranges too large for the worker's
arithmetic are a 400 when set, and a configuration stored before those limits (the API took
them) still loads and runs; `null` clears any of dloop's own fields back to its default."""

from __future__ import annotations

from typing import Any

import pytest

from service.storage.models import Decision
from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness

CFG = "/personalizer/v1.0/configurations/service"
DAY = 86400.0


def _put(h: Harness, loop: str = "", **changes: Any) -> Any:
    cfg = h.client.get(f"{loop}{CFG}", headers=AUTH).json()
    return h.client.put(f"{loop}{CFG}", json={**cfg, **changes}, headers=AUTH)


def _refused(h: Harness, message: str, **changes: Any) -> None:
    r = _put(h, **changes)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "InvalidServiceConfiguration"
    assert message in error["message"], error["message"]


def _stored_before_the_limits(h: Harness, loop: str = "default", **changes: Any) -> None:
    """Store a configuration as the API took it before these limits existed."""
    rt = h.dloop.registry.loops[loop]
    h.dloop.control.save(rt, config={**rt.config, **changes}, policy=rt.policy)


def _decisions(h: Harness, loop: str) -> int:
    with h.dloop.sessions() as session:
        return session.query(Decision).filter_by(loop=loop).count()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"logRetentionDays": 10**304}, "logRetentionDays must be -1 (forever) or from 2 to 36500"),
        ({"logRetentionDays": 36_501}, "logRetentionDays must be -1 (forever) or from 2 to 36500"),
        (
            {"logRetentionDays": -1, "modelRetrainDays": 10**309},
            "modelRetrainDays must be from 0 to 36500",
        ),
        (
            {"logRetentionDays": -1, "modelRetrainDays": 36_501},
            "modelRetrainDays must be from 0 to 36500",
        ),
    ],
)
def test_day_counts_past_a_century_are_a_400(
    harness: Harness, changes: dict[str, Any], message: str
) -> None:
    _refused(harness, message, **changes)


def test_a_century_and_forever_are_taken(harness: Harness) -> None:
    cfg = harness.configure(logRetentionDays=36_500, modelRetrainDays=36_500)
    assert (cfg["logRetentionDays"], cfg["modelRetrainDays"]) == (36_500, 36_500)
    assert harness.configure(logRetentionDays=-1)["logRetentionDays"] == -1


def test_a_stored_retention_too_large_for_the_clock_keeps_every_loop_s_retention(
    harness: Harness,
) -> None:
    """10**304 days made the retention pass raise OverflowError: the worker stopped for every
    loop, and again after each restart."""
    _stored_before_the_limits(harness, logRetentionDays=10**304)
    assert harness.client.put("/loops/other", json={"kind": "cb"}, headers=AUTH).status_code < 300
    assert _put(harness, "/loops/other", logRetentionDays=2).status_code == 200
    harness.rank(rank_body("d1"))
    harness.rank(rank_body("o1"), path="/loops/other/personalizer/v1.0/rank")
    harness.work()
    assert (_decisions(harness, "default"), _decisions(harness, "other")) == (1, 1)
    harness.clock.advance(3 * DAY)
    harness.work()
    # The other loop's events past its two days are gone; the default loop keeps its events.
    assert (_decisions(harness, "default"), _decisions(harness, "other")) == (1, 0)
    # Set again, the stored value is refused and names the limit; a valid one replaces it.
    _refused(harness, "logRetentionDays must be -1", rewardWaitTime="PT5S")
    assert harness.configure(logRetentionDays=90)["logRetentionDays"] == 90


def test_a_stored_retrain_window_too_large_for_the_clock_still_retrains(harness: Harness) -> None:
    """10**309 days made every retrain (a new policy or reward definition) a 500 after the
    configuration or policy had been saved."""
    _stored_before_the_limits(harness, logRetentionDays=-1, modelRetrainDays=10**309)
    policy = {"name": "p", "arguments": "--cb_explore_adf --epsilon 0.1"}
    r = harness.client.put("/personalizer/v1.0/configurations/policy", json=policy, headers=AUTH)
    assert r.status_code == 200, r.text
    _refused(harness, "modelRetrainDays must be from 0 to 36500", rewardDefinition="reward")
    fixed = harness.configure(modelRetrainDays=2, rewardDefinition="reward")
    assert fixed["rewardDefinitionVersion"] == 1


@pytest.mark.parametrize(
    "outcome",
    [
        {"name": "x", "min": -1e308, "max": 1e308},
        {"name": "x", "min": 0, "max": 1e13},
        {"name": "x", "min": -1e13, "max": 0, "default": None},
    ],
)
def test_outcome_ranges_past_1e12_are_a_400(harness: Harness, outcome: dict[str, Any]) -> None:
    _refused(
        harness,
        "outcomes.0: outcome x: min and max must lie between -1e+12 and 1e+12",
        outcomes=[outcome],
    )


def test_outcomes_at_the_limit_join_with_guardrails_and_a_holdout(harness: Harness) -> None:
    """Values of ±1e12 keep the rollups' sums (squares, inverse-propensity weights) finite:
    near 1e308 they overflowed to inf, inf - inf gave NaN, and the loop never joined again."""
    harness.configure(
        outcomes=[{"name": "x", "min": -1e12, "max": 1e12}],
        guardrails=[{"outcome": "x", "mustNot": "increase", "tolerance": 0.1}],
        holdoutPercentage=50,
        rewardWaitTime="PT5S",
    )
    for i in range(80):
        harness.rank(rank_body(f"e{i}", unitId=f"u{i}"))
        r = harness.client.post(
            f"/personalizer/v1.0/events/e{i}/outcomes",
            json={"outcomes": {"x": 1e12 if i % 2 else -1e12}},
            headers=AUTH,
        )
        assert r.status_code == 204, r.text
    harness.clock.advance(10)
    harness.work()
    assert harness.dloop.worker is not None and not harness.dloop.worker.failing
    for i in (0, 79):
        event = harness.client.get(f"/personalizer/v1.0/events/e{i}", headers=AUTH).json()
        assert event["joined"], event
    r = harness.client.get("/loops/default/guardrails", headers=AUTH)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "value", "default"),
    [
        ("outcomes", [{"name": "click", "min": 0, "max": 1}], []),
        ("guardrails", [{"outcome": "reward", "mustNot": "decrease"}], []),
        ("exposureCaps", [{"actionId": "news", "maxShare": 0.5}], []),
        ("discountFactor", 0.5, 0.99),
        ("holdoutPercentage", 10, 0.0),
        ("holdoutPolicy", "random", "baseline"),
        ("rewardDefinition", "reward", None),
        ("maxExplorationProbability", 0.3, None),
        ("tileCoding", {"widths": {"u.x": [1]}}, None),
    ],
)
def test_null_clears_each_of_dloop_s_fields(
    harness: Harness, field: str, value: Any, default: Any
) -> None:
    """README: a Personalizer SDK's update keeps dloop's own fields; send null to clear one."""
    assert harness.configure(**{field: value}).get(field) not in (None, default)
    cleared = harness.configure(**{field: None})
    assert cleared.get(field) == default
    # Cleared, not kept: an update without the field leaves it at its default.
    kept = harness.client.get(CFG, headers=AUTH).json()
    kept.pop(field, None)
    r = harness.client.put(CFG, json=kept, headers=AUTH)
    assert r.status_code == 200 and r.json().get(field) == default, r.text


def test_tile_widths_have_a_floor_when_set_and_a_stored_narrower_one_still_serves(
    harness: Harness,
) -> None:
    """A tile width under 1e-9 is a 400 when set (a value's cell is value / width: 1e-320 made
    every rank of the feature overflow, a 500); one stored before the floor loads, and a
    value it cannot code is the rank's 400."""
    _refused(
        harness, "tile widths must be at least 1e-09", tileCoding={"widths": {"u.x": [1e-320]}}
    )
    assert _put(harness, tileCoding={"widths": {"u.x": [1e-9]}}).status_code == 200
    _stored_before_the_limits(harness, tileCoding={"tilings": 8, "widths": {"u.x": [1e-320]}})
    body = {**rank_body("t1"), "contextFeatures": [{"u": {"x": 1.0}}]}
    r = harness.client.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert "too large for its tile width" in r.json()["error"]["message"]
