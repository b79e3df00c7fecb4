"""The production path across processes: `dloop serve` + `dloop join` + `dloop learn` on a
real Kafka-protocol broker (Tansu) and a real Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import create_engine, func, select

from service.migrate import upgrade
from service.models import Joined, ModelCheckpoint, Observation
from tests.conftest import Broker, free_port

KEY = "prod-admin-key"
HEADERS = {"Ocp-Apim-Subscription-Key": KEY}
ACTIONS = [{"id": f"a{i}", "features": [{"kind": f"k{i}"}]} for i in range(4)]


@dataclass
class Stack:
    url: str
    db_url: str
    env: dict[str, str]
    data_dir: Path
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def start(self, role: str, *args: str) -> None:
        self.procs[role] = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self, role: str, sig: int = signal.SIGTERM) -> str:
        proc = self.procs.pop(role)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        return err

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers=HEADERS, timeout=10, **kw)


@pytest.fixture
def stack(postgres_url: str, kafka_broker: Broker, tmp_path: Path) -> Iterator[Stack]:
    upgrade(postgres_url)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DLOOP_")},
        "DLOOP_DB__URL": postgres_url,
        "DLOOP_KAFKA__BOOTSTRAP_SERVERS": kafka_broker.address,
        "DLOOP_KAFKA__TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}",
        "DLOOP_KAFKA__PARTITIONS": "4",
        "DLOOP_API_KEY": KEY,
        "DLOOP_DATA_DIR": str(tmp_path / "api"),
    }
    s = Stack(f"http://127.0.0.1:{port}", postgres_url, env, tmp_path / "api")
    s.start("serve", "serve", "--host", "127.0.0.1", "--port", str(port))
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(f"{s.url}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, s.stop("serve")
        time.sleep(0.2)
    s.start("join", "join")
    s.start("learn", "learn")
    try:
        yield s
    finally:
        for role in list(s.procs):
            s.stop(role)


def count(db_url: str, stmt: Any) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(stmt) or 0)
    finally:
        engine.dispose()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_rank_reward_join_learn_across_processes(stack: Stack) -> None:
    cfg = stack.api("GET", "/personalizer/v1.0/configurations/service").json()
    cfg.update(modelExportFrequency="PT1S", rewardWaitTime="PT4S", rewardAggregation="earliest")
    assert (
        stack.api("PUT", "/personalizer/v1.0/configurations/service", json=cfg).status_code == 200
    )

    n = 1200
    expected: dict[str, float] = {}
    with httpx.Client(base_url=stack.url, headers=HEADERS, timeout=10) as client:
        for i in range(n):
            event_id = f"e{i}"
            body = {
                "contextFeatures": [{"u": f"u{i % 5}"}],
                "actions": ACTIONS,
                "eventId": event_id,
            }
            r = client.post("/personalizer/v1.0/rank", json=body)
            assert r.status_code == 201
            if i % 7 == 0:  # a client retry of the same rank
                assert client.post("/personalizer/v1.0/rank", json=body).content == r.content
            chosen = r.json()["rewardActionId"]
            value = 1.0 if chosen == f"a{i % 4}" else 0.0
            if i % 3:
                client.post(f"/personalizer/v1.0/events/{event_id}/reward", json={"value": value})
                expected[event_id] = value
                if i % 5 == 0:  # duplicate reward call: earliest keeps the first
                    client.post(f"/personalizer/v1.0/events/{event_id}/reward", json={"value": 0.5})
            else:
                expected[event_id] = 0.0  # default reward after the window
        for i in range(20):  # orphans: rewards for events never ranked
            client.post(f"/personalizer/v1.0/events/ghost{i}/reward", json={"value": 1})

    wait_for(
        lambda: count(stack.db_url, select(func.count()).select_from(Joined)) == n, 60, "joins"
    )
    engine = create_engine(stack.db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(Joined.event_id, Joined.line)).all()
    engine.dispose()
    assert len({e for e, _ in rows}) == n
    for event_id, line in rows:
        assert orjson.loads(line)["_label_cost"] == -expected[event_id], event_id
    assert (
        count(stack.db_url, select(func.count()).where(Observation.event_id.like("ghost%"))) == 20
    )

    wait_for(lambda: count(stack.db_url, select(ModelCheckpoint.examples)) == n, 30, "the learner")
    wait_for(
        lambda: 'model_id="N/A"' not in stack.api("GET", "/metrics").text, 10, "a served model"
    )
    # The learner may be restarted: it resumes from its checkpoint and learns nothing twice.
    stack.stop("learn", signal.SIGKILL)
    stack.start("learn", "learn")
    time.sleep(8)
    assert count(stack.db_url, select(ModelCheckpoint.examples)) == n
