"""The live holdout through the API (issue 14): held-out decisions are served by the holdout
policy, marked in the response and the log, sticky per unitId (per episode in RL loops, for
every slot of a multi-slot decision), joined and learned like any other; GET /loops/{loop}/holdout
reports the uplift the rollups hold, and it is the uplift computed from the responses
themselves. (The statistics are judged on simulated worlds in tests/unit/learners/
test_holdout.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from learners.holdout import Moments, uplift
from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness


def _rank(h: Harness, event_id: str, **kw: Any) -> dict[str, Any]:
    return h.rank(rank_body(event_id, **kw))


def test_holdout_decisions_are_served_by_the_baseline_marked_and_sticky(harness: Harness) -> None:
    cfg = harness.configure(holdoutPercentage=30)
    assert (cfg["holdoutPercentage"], cfg["holdoutPolicy"]) == (30, "baseline")
    sides: dict[str, set[bool]] = {}
    for i in range(300):
        unit = f"user{i % 60}"
        out = _rank(harness, f"e{i}", unitId=unit, excludedActions=["news"])
        held = out.get("holdout", False)
        sides.setdefault(unit, set()).add(held)
        if held:
            assert out["holdout"] is True
            # The baseline is the first action not excluded, served with certainty.
            assert out["rewardActionId"] == "sports"
            assert out["ranking"][0] == {"id": "sports", "probability": 1.0}
    assert all(len(s) == 1 for s in sides.values())  # a unit stays on its side
    held_units = sum(s == {True} for s in sides.values())
    assert 8 <= held_units <= 28  # about 30% of 60
    harness.work()
    # The log keeps the mark and the probabilities the decision was drawn with.
    held_id = next(f"e{i}" for i in range(300) if sides[f"user{i % 60}"] == {True})
    event = harness.client.get(f"/personalizer/v1.0/events/{held_id}", headers=AUTH).json()
    assert event["holdout"] is True
    assert event["ranking"][0] == {"id": "sports", "probability": 1.0}
    assert event["contextFeatures"] == [{"time": "morning"}]
    assert [a["id"] for a in event["actions"]] == ["news", "sports", "tech"]


def test_random_holdout_policy_draws_uniformly_among_eligible_actions(harness: Harness) -> None:
    harness.configure(holdoutPercentage=50, holdoutPolicy="random")
    chosen = set()
    for i in range(200):
        out = _rank(harness, f"e{i}", excludedActions=["tech"])
        if out.get("holdout"):
            probs = {a["id"]: a["probability"] for a in out["ranking"]}
            assert probs == {"news": 0.5, "sports": 0.5, "tech": 0.0}
            chosen.add(out["rewardActionId"])
    assert chosen == {"news", "sports"}


def test_no_holdout_unless_asked_nor_outside_online_mode(harness: Harness) -> None:
    assert not any("holdout" in _rank(harness, f"e{i}") for i in range(50))
    harness.configure(holdoutPercentage=50, learningMode="Apprentice")
    assert not any("holdout" in _rank(harness, f"a{i}") for i in range(50))


@pytest.mark.parametrize(
    "changes",
    [
        {"holdoutPercentage": 51},
        {"holdoutPercentage": -1},
        {"holdoutPercentage": "half"},
        {"holdoutPolicy": "oracle"},
    ],
)
def test_bad_holdout_configuration_is_a_400(harness: Harness, changes: dict[str, Any]) -> None:
    cfg = harness.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
    r = harness.client.put(
        "/personalizer/v1.0/configurations/service", json={**cfg, **changes}, headers=AUTH
    )
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"code", "message"}


def test_bad_unit_id_is_a_400(harness: Harness) -> None:
    for bad in ("", 7, "x" * 300, "a\nb"):
        r = harness.client.post(
            "/personalizer/v1.0/rank", json=rank_body("e1", unitId=bad), headers=AUTH
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "InvalidRankRequest"


def test_uplift_endpoint_reports_what_the_responses_show(harness: Harness) -> None:
    """Reward 1 for tech, 0 otherwise: the baseline (news) earns nothing, the learning policy
    finds tech. The endpoint's uplift is the one computed from the responses and rewards."""
    harness.configure(holdoutPercentage=20)
    doc = harness.client.get("/loops/default/holdout", headers=AUTH).json()
    assert doc["uplift"] is None and doc["status"] == "no holdout decisions yet"
    online, held = Moments(), Moments()
    for i in range(600):
        out = _rank(harness, f"e{i}", contextFeatures=[{"n": i % 5}])
        reward = 1.0 if out["rewardActionId"] == "tech" else 0.0
        harness.reward(f"e{i}", reward)
        (held if out.get("holdout") else online).add(reward)
        if i == 20:
            harness.work()
            early = harness.client.get("/loops/default/holdout", headers=AUTH).json()
            assert early["uplift"] is None
            assert early["status"].startswith("not enough data yet")
        if i % 50 == 49:
            harness.work()
    harness.work()
    doc = harness.client.get("/loops/default/holdout", headers=AUTH).json()
    assert doc["online"] == {"decisions": online.n, "meanReward": pytest.approx(online.mean)}
    assert doc["holdout"] == {"decisions": held.n, "meanReward": 0.0}
    expected = uplift(online, held, Moments(1, 1, 1))
    assert expected is not None
    assert doc["uplift"]["estimate"] == pytest.approx(expected.estimate)
    assert doc["uplift"]["interval95"] == pytest.approx(list(expected.interval95))
    lo, hi = doc["uplift"]["alwaysValid95"]
    assert 0 < lo < expected.estimate < hi
    assert doc["status"] == "the online policy earns more than the holdout"


def test_unknown_loop_and_no_key(harness: Harness) -> None:
    assert harness.client.get("/loops/nope/holdout", headers=AUTH).status_code == 404
    assert harness.client.get("/loops/default/holdout").status_code == 401


def _loop(harness: Harness, name: str, kind: str, **config: Any) -> str:
    r = harness.client.put(f"/loops/{name}", json={"kind": kind}, headers=AUTH)
    assert r.status_code == 201, r.text
    base = f"/loops/{name}/personalizer/v1.0/configurations/service"
    cfg = harness.client.get(base, headers=AUTH).json()
    r = harness.client.put(base, json={**cfg, **config}, headers=AUTH)
    assert r.status_code == 200, r.text
    return f"/loops/{name}/personalizer"


def test_multi_slot_holdout_serves_every_slots_baseline(harness: Harness) -> None:
    from tests.api.test_ccb import page

    base = _loop(harness, "page", "ccb", holdoutPercentage=40, rewardWaitTime="PT5S")
    held = 0
    for i in range(100):
        r = harness.client.post(
            f"{base}/v1.1-preview.1/multislot/rank", json=page(f"p{i}"), headers=AUTH
        )
        assert r.status_code == 201, r.text
        out = r.json()
        if out.get("holdout"):
            held += 1
            served = [(s["id"], s["rewardActionId"], s["probability"]) for s in out["slots"]]
            assert served == [("hero", "a0", 1.0), ("side", "a1", 1.0), ("foot", "a2", 1.0)]
        reward = [
            {"slotId": "hero", "value": 1.0 if out["slots"][0]["rewardActionId"] == "a3" else 0.0}
        ]
        r = harness.client.post(
            f"{base}/v1.1-preview.1/multislot/events/p{i}/reward",
            json={"reward": reward},
            headers=AUTH,
        )
        assert r.status_code == 204, r.text
    assert 25 <= held <= 55
    harness.clock.advance(10)
    harness.work()
    doc = harness.client.get("/loops/page/holdout", headers=AUTH).json()
    assert doc["holdout"]["decisions"] == held
    assert doc["online"]["decisions"] == 100 - held
    assert doc["holdout"]["meanReward"] == 0.0  # the baseline a0 is never a3
    # Per slot in the statistics.
    stats = harness.client.get("/loops/page/stats", headers=AUTH).json()
    slots = {s["id"]: s for b in stats["buckets"] for s in b.get("slots", [])}
    assert set(slots) == {"hero", "side", "foot"}
    assert slots["hero"]["meanReward"]["holdout"] == 0.0
    assert sum(slots["hero"]["actionShares"].values()) == pytest.approx(1.0)


def test_rl_holdout_is_per_episode(harness: Harness) -> None:
    base = _loop(harness, "tutor", "rl", holdoutPercentage=50)
    actions = [{"id": f"a{i}", "features": [{"a": i}]} for i in range(3)]
    sides = {}
    for e in range(40):
        seen = set()
        for step in range(4):
            r = harness.client.post(
                f"{base}/v1.0/rank",
                json={
                    "contextFeatures": [{"s": step}],
                    "actions": actions,
                    "episodeId": f"ep{e}",
                    "eventId": f"ep{e}-{step}",
                },
                headers=AUTH,
            )
            assert r.status_code == 201, r.text
            seen.add(r.json().get("holdout", False))
        assert len(seen) == 1  # every step of an episode on the same side
        sides[e] = seen.pop()
    assert 10 <= sum(sides.values()) <= 30
