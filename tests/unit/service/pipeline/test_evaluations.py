"""Offline evaluation jobs (service.pipeline.evaluations): a job runs VW in a process of its own,
so a native crash there fails that job and nothing else."""

from __future__ import annotations

import os

import pytest

from tests.support.harness import AUTH, Harness


@pytest.mark.slow
def test_an_evaluation_whose_process_crashes_fails_alone(harness: Harness) -> None:
    """Evaluations train VW policies on logged input in a process of their own: a native crash
    there (here: SIGSEGV sent to it) fails the job and nothing else."""
    import multiprocessing
    import signal
    import time

    h = harness
    h.configure(rewardWaitTime="PT1S", modelExportFrequency="PT1S")
    actions = [{"id": f"a{i}", "features": [{"f": i}]} for i in range(4)]
    for i in range(1500):
        body = {"eventId": f"e{i}", "contextFeatures": [{"u": i % 7}], "actions": actions}
        out = h.rank(body)
        h.reward(f"e{i}", 1.0 if out["rewardActionId"] == "a1" else 0.0)
    h.clock.advance(5)
    h.work()
    window = {"name": "x", "startTime": "2000-01-01T00:00:00Z", "endTime": "2100-01-01T00:00:00Z"}
    r = h.client.put(
        "/personalizer/v1.0/evaluations/doomed",
        json={**window, "enablePolicyOptimization": True},
        headers=AUTH,
    )
    assert r.status_code in (200, 201), r.text
    deadline = time.monotonic() + 60
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "the evaluation never ran in a process of its own"
        victim = next(
            (p for p in multiprocessing.active_children() if p.name == "dloop-evaluation"), None
        )
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGSEGV)
    while True:
        doc = h.client.get("/personalizer/v1.0/evaluations/doomed", headers=AUTH).json()
        if doc["status"] == "Failed":
            break
        assert time.monotonic() < deadline and doc["status"] != "Succeeded", doc
        time.sleep(0.05)
    assert "SIGSEGV" in doc["description"]
    assert h.client.get("/healthz").status_code == 200
    h.rank({"contextFeatures": [{"u": 1}], "actions": actions})
