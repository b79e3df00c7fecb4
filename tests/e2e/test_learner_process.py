"""`dloop up`'s learner runs in a process of its own (service.pipeline.learner_process), at the
a lower CPU priority, beside the serving process: what it publishes reaches serving, what the
API changes (a reset, a configuration) reaches it, and when it dies another takes over with
nothing lost."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from tests.support.harness import AUTH, LiveServer
from tests.support.production import wait_for

API = "/personalizer/v1.0"


def learners() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "dloop-learner"]


def stays(what: str, check: Callable[[], bool], seconds: float) -> None:
    """`check` holds throughout `seconds` (what must not happen would have by then)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert check(), what
        time.sleep(0.05)


def decide(client: httpx.Client, n: int, prefix: str) -> None:
    """`n` decisions, each rewarded 1 when the first action was chosen."""
    actions = [{"id": a, "features": [{"a": a}]} for a in ("x", "y", "z")]
    for i in range(n):
        event = f"{prefix}-{i}"
        r = client.post(f"{API}/rank", json={"eventId": event, "actions": actions})
        assert r.status_code == 201, r.text
        value = 1.0 if r.json()["rewardActionId"] == "x" else 0.0
        client.post(f"{API}/events/{event}/reward", json={"value": value}).raise_for_status()


def backlog(client: httpx.Client) -> int:
    return int(client.get("/readyz").json()["logBacklogBytes"])


def examples(client: httpx.Client) -> int:
    m = re.search(r'dloop_model_examples\{loop="default"\} (\d+)', client.get("/metrics").text)
    return int(m.group(1)) if m else 0


def test_the_learner_runs_apart_publishes_to_serving_and_is_replaced_when_it_dies(
    live_server: LiveServer,
) -> None:
    with httpx.Client(base_url=live_server.url, headers=AUTH, timeout=30) as client:
        cfg = client.get(f"{API}/configurations/service").json()
        cfg |= {"rewardWaitTime": "PT1S", "modelExportFrequency": "PT1S"}
        assert client.put(f"{API}/configurations/service", json=cfg).status_code == 200
        (first,) = learners()
        assert first.pid != os.getpid()
        # serving comes first
        wait_for(lambda: os.getpriority(os.PRIO_PROCESS, first.pid) > 0, what="a lower priority")
        before = client.get(f"{API}/model/properties").json()["lastModifiedTime"]
        decide(client, 20, "a")
        # learned in the learner process, served by this one
        wait_for(lambda: examples(client) >= 20, what="a model")
        assert client.get(f"{API}/model/properties").json()["lastModifiedTime"] != before
        assert client.get("/readyz").json()["status"] == "ready"

        os.kill(first.pid, signal.SIGKILL)
        (second,) = wait_for(lambda: [p for p in learners() if p != first], what="another learner")
        decide(client, 20, "b")  # ranked while the learner was away or starting: not lost
        wait_for(lambda: examples(client) >= 40, what="the decisions after the crash")
        assert client.get("/readyz").json()["status"] == "ready"
        assert second.is_alive()


def test_a_reset_and_a_configuration_reach_the_learner(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, headers=AUTH, timeout=30) as client:
        cfg = client.get(f"{API}/configurations/service").json()
        cfg |= {"rewardWaitTime": "PT1S", "modelExportFrequency": "PT1S"}
        assert client.put(f"{API}/configurations/service", json=cfg).status_code == 200
        decide(client, 15, "a")
        wait_for(lambda: examples(client) >= 15, what="a model")
        # A reset: the learner starts from the blank model (had it not heard, its next export
        # would carry the 15 examples on).
        assert client.delete(f"{API}/model").status_code == 204
        assert examples(client) == 0
        decide(client, 5, "b")
        wait_for(lambda: examples(client) == 5, what="the reset model's examples")
        stays("nothing older comes back", lambda: examples(client) == 5, 2.0)
        # A new export period: the learner keeps what it learns until then (had it not heard,
        # it would export within a second).
        cfg["modelExportFrequency"] = "PT1H"
        assert client.put(f"{API}/configurations/service", json=cfg).status_code == 200
        decide(client, 5, "c")
        wait_for(lambda: backlog(client) == 0, what="the decisions ingested")
        stays("no export before the hour", lambda: examples(client) == 5, 3.0)


def test_the_learner_keeps_learning_while_other_work_saturates_every_core(
    live_server: LiveServer,
) -> None:
    """Serving comes first, but the learner never starves: with a normal-priority busy loop on
    every core, decisions are still learned and published within seconds (at the lowest
    priority, SCHED_IDLE, it got almost nothing, and a demo under a loaded CI never published)."""
    with httpx.Client(base_url=live_server.url, headers=AUTH, timeout=30) as client:
        cfg = client.get(f"{API}/configurations/service").json()
        cfg |= {"rewardWaitTime": "PT1S", "modelExportFrequency": "PT1S"}
        assert client.put(f"{API}/configurations/service", json=cfg).status_code == 200
        burn = [sys.executable, "-c", "while True: pass"]
        burners = [subprocess.Popen(burn) for _ in range(os.cpu_count() or 1)]
        try:
            decide(client, 10, "a")
            wait_for(lambda: examples(client) >= 10, timeout=60, what="a model under load")
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
