"""service.api.routes.loops: named loops are created, listed and deleted, each with its own
configuration, policy and logs."""

from __future__ import annotations

from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness


def test_named_loops_are_independent(harness: Harness) -> None:
    r = harness.client.put("/loops/shop", json={"kind": "cb"}, headers=AUTH)
    assert r.status_code == 201
    assert harness.client.put("/loops/shop", json={"kind": "cb"}, headers=AUTH).status_code == 200
    r = harness.client.put("/loops/bad name!", json={"kind": "cb"}, headers=AUTH)
    assert r.status_code in (400, 404)
    r = harness.client.put("/loops/x", json={"kind": "quantum"}, headers=AUTH)
    assert r.status_code == 400
    names = [loop["name"] for loop in harness.client.get("/loops", headers=AUTH).json()["value"]]
    assert names == ["default", "shop"]
    harness.client.put(
        "/loops/shop/personalizer/v1.0/configurations/policy",
        json={"name": "greedy", "arguments": "--cb_explore_adf --epsilon 0 -q ::"},
        headers=AUTH,
    )
    policy = harness.client.get("/personalizer/v1.0/configurations/policy", headers=AUTH).json()
    assert policy["name"] == "dloop-default"
    harness.rank(rank_body("shop-1"), "/loops/shop/personalizer/v1.0/rank")
    harness.work()
    r = harness.client.get("/loops/shop/personalizer/v1.0/logs/properties", headers=AUTH)
    assert r.status_code == 200
    r = harness.client.get("/personalizer/v1.0/logs/properties", headers=AUTH)
    assert r.status_code == 200 and r.json() == {}
    assert harness.client.delete("/loops/shop", headers=AUTH).status_code == 204
    r = harness.client.post("/loops/shop/personalizer/v1.0/rank", json=rank_body(), headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound"
    assert harness.client.delete("/loops/default", headers=AUTH).status_code == 400


def test_a_new_loop_explores_as_its_kind_does(harness: Harness) -> None:
    """Bandit loops start at Personalizer's explorationPercentage, RL loops explore more
    (learners.rl.DEFAULT_RL_EXPLORATION, measured in benchmarks/rl.py)."""
    for name, kind, exploration in (("shop", "cb", 0.2), ("page", "ccb", 0.2), ("game", "rl", 0.3)):
        harness.client.put(f"/loops/{name}", json={"kind": kind}, headers=AUTH)
        r = harness.client.get(
            f"/loops/{name}/personalizer/v1.0/configurations/service", headers=AUTH
        )
        assert r.json()["explorationPercentage"] == exploration, kind
