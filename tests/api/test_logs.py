"""service.api.routes.logs: the log properties of a loop and deleting its logs."""

from __future__ import annotations

from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness


def test_logs_properties_and_delete(harness: Harness) -> None:
    r = harness.client.get("/personalizer/v1.0/logs/properties", headers=AUTH)
    assert r.status_code == 200 and r.json() == {}  # as Personalizer answered: no dateRange
    harness.rank(rank_body("l1"))
    harness.work()
    r = harness.client.get("/personalizer/v1.0/logs/properties", headers=AUTH)
    assert r.status_code == 200 and r.json()["dateRange"]["from"].endswith("Z")
    assert harness.client.delete("/personalizer/v1.0/logs", headers=AUTH).status_code == 204
    r = harness.client.get("/personalizer/v1.0/logs/properties", headers=AUTH)
    assert r.status_code == 200 and r.json() == {}
