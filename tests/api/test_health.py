"""service.api.routes.health: liveness and readiness answer without a key, metrics need one."""

from __future__ import annotations

from tests.support.harness import Harness


def test_health_needs_no_key(harness: Harness) -> None:
    assert harness.client.get("/healthz").status_code == 200
    r = harness.client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert harness.client.get("/metrics").status_code == 401
