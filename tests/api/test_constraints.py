"""Serving-time constraints through the API (issue 15): an exposure cap holds an action's share
of decisions near its cap in a sliding window, the exploration limit bounds what a decision puts
off its top action, and the probabilities answered and logged are the ones the draw used."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness, joined


def _teach(h: Harness, n: int = 300) -> None:
    """A model that wants `sports` (reward 1 for it, 0 otherwise)."""
    for i in range(n):
        out = h.rank(rank_body(f"t{i}"))
        h.reward(f"t{i}", 1.0 if out["rewardActionId"] == "sports" else 0.0)
    h.clock.advance(601)
    h.work()


def test_an_exposure_cap_holds_the_share_and_the_log_keeps_the_used_probabilities(
    harness: Harness,
) -> None:
    _teach(harness)
    free = [harness.rank(rank_body(f"f{i}"))["rewardActionId"] for i in range(200)]
    assert free.count("sports") > 150
    cfg = harness.configure(
        exposureCaps=[{"actionId": "sports", "maxShare": 0.3, "window": "PT1M"}]
    )
    assert cfg["exposureCaps"] == [{"actionId": "sports", "maxShare": 0.3, "window": "PT1M"}]
    served: list[dict[str, Any]] = []
    for i in range(1200):
        harness.clock.advance(0.1)
        served.append(harness.rank(rank_body(f"c{i}")))
    share = sum(o["rewardActionId"] == "sports" for o in served[600:]) / 600
    assert share == pytest.approx(0.3, abs=0.06)
    capped = [
        o
        for o in served
        if {a["id"]: a["probability"] for a in o["ranking"]}["sports"] <= 0.3 + 1e-9
    ]
    assert len(capped) > 300  # decisions drawn with the cap in force
    harness.clock.advance(601)
    harness.work()
    for o in served[-50:]:
        line = joined(harness, o["eventId"])
        assert line is not None
        assert line["p"] == [a["probability"] for a in o["ranking"]]


def test_the_exploration_limit_bounds_every_decision(harness: Harness) -> None:
    harness.configure(maxExplorationProbability=0.1, explorationPercentage=0.5)
    for i in range(100):
        out = harness.rank(rank_body(f"e{i}"))
        top = max(a["probability"] for a in out["ranking"])
        assert 1 - top <= 0.1 + 1e-9


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"exposureCaps": [{"actionId": "x", "maxShare": 1.5}]}, "exposureCaps.0.maxShare"),
        ({"exposureCaps": [{"actionId": "x", "maxShare": 0.2, "window": "PT0S"}]}, "window"),
        ({"exposureCaps": [{"actionId": "x", "maxShare": 0.2}] * 2}, "one per action"),
        ({"maxExplorationProbability": 2}, "maxExplorationProbability"),
    ],
)
def test_bad_constraints_are_a_400(harness: Harness, changes: dict[str, Any], message: str) -> None:
    cfg = harness.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
    r = harness.client.put(
        "/personalizer/v1.0/configurations/service", json={**cfg, **changes}, headers=AUTH
    )
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_constraints_are_for_single_slot_loops(harness: Harness) -> None:
    assert harness.client.put("/loops/page", json={"kind": "ccb"}, headers=AUTH).status_code == 201
    path = "/loops/page/personalizer/v1.0/configurations/service"
    cfg = harness.client.get(path, headers=AUTH).json()
    r = harness.client.put(path, json={**cfg, "maxExplorationProbability": 0.1}, headers=AUTH)
    assert r.status_code == 400
    assert "single-slot loops" in r.json()["error"]["message"]
