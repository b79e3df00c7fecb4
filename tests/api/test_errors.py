"""Errors whichever layer gives them (service.api.errors, middleware): Personalizer-shaped
answers to unknown paths and methods, and every 4xx/5xx counted by status."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.storage import store
from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness


def test_unknown_path_and_method(harness: Harness) -> None:
    r = harness.client.get("/personalizer/v1.0/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound"
    r = harness.client.get("/personalizer/v1.0/rank", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_every_error_answer_is_counted_by_status(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dloop_http_errors counts the 4xx and 5xx answers by status, whichever layer gave them:
    the key check before any route, the hot path, a FastAPI route, the router, and the 500s of
    the hot path and of the framework (which answers outside every middleware)."""
    c = harness.client
    assert c.post("/personalizer/rank", json=rank_body()).status_code == 401
    assert c.post("/personalizer/rank", json={}, headers=AUTH).status_code == 400
    assert c.get("/loops/nope/personalizer/configurations/policy", headers=AUTH).status_code == 404
    assert c.get("/nowhere", headers=AUTH).status_code == 404
    assert c.get("/personalizer/configurations/policy", headers=AUTH).status_code == 200

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(harness.dloop.log, "append", broken)
    assert c.post("/personalizer/rank", json=rank_body(), headers=AUTH).status_code == 500
    monkeypatch.setattr(store, "log_range", broken)
    unraised = TestClient(c.app, raise_server_exceptions=False)  # the lifespan already ran
    assert unraised.get("/personalizer/logs/properties", headers=AUTH).status_code == 500

    metrics = c.get("/metrics", headers=AUTH).text
    assert 'dloop_http_errors_total{code="400"} 1.0' in metrics
    assert 'dloop_http_errors_total{code="401"} 1.0' in metrics
    assert 'dloop_http_errors_total{code="404"} 2.0' in metrics
    assert 'dloop_http_errors_total{code="500"} 2.0' in metrics
    assert 'dloop_http_errors_total{code="2' not in metrics
