"""The in-process ranker (service.local) against a real server: it needs no server package
(FastAPI, SQLAlchemy, Kafka, ... are blocked from importing), it learns of a new model within
about a second of its publication by a long poll, and its background thread ships what it
decided, so the loop learns from it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text

from service.local import LocalRanker
from service.storage.models import Joined
from tests.support.harness import AUTH, LiveServer, make_settings, serving
from tests.support.production import Stack, count, wait_for
from tests.support.services import free_port

BLOCKED = [
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "kafka",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "typer",
    "prometheus_client",
    "plotly",
    "itsdangerous",
    "matplotlib",
    "gymnasium",
]

CLOSURE = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import service.local
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"vowpalwabbit", "httpx", "numpy"}}))
"""


def test_the_local_ranker_imports_no_server_package() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CLOSURE], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['httpx', 'numpy', 'vowpalwabbit']"


def test_a_new_model_reaches_the_local_ranker_within_a_second(live_server: LiveServer) -> None:
    url = live_server.url
    httpx.put(
        f"{url}/personalizer/v1.0/configurations/service",
        json={
            **httpx.get(f"{url}/personalizer/v1.0/configurations/service", headers=AUTH).json(),
            "rewardWaitTime": "PT1S",
            "modelExportFrequency": "PT1S",
        },
        headers=AUTH,
    ).raise_for_status()
    key = httpx.post(f"{url}/loops/default/keys", headers=AUTH).json()["key"]
    actions = [{"id": f"a{i}", "features": [{"t": i}]} for i in range(4)]
    lags = []
    with LocalRanker(url, key=key, ship_every=0.1) as local:
        assert local.served.model_id == "N/A"
        for round_ in range(3):
            for i in range(50):
                out = local.rank({"contextFeatures": [{"u": i % 5}], "actions": actions})
                local.reward(out["eventId"], 1.0 if out["rewardActionId"] == "a2" else 0.0)
            before = local.served.model_id
            deadline = time.monotonic() + 30
            while True:  # the server publishes a model that learned them
                served = httpx.get(
                    f"{url}/personalizer/v1.0/local/settings",
                    headers={"Authorization": f"Bearer {key}"},
                ).json()["modelId"]
                if served != before:
                    published = time.monotonic()
                    break
                assert time.monotonic() < deadline, f"no new model in round {round_}"
                time.sleep(0.01)
            while local.served.model_id == before:
                assert time.monotonic() - published < 5, "the local ranker did not follow"
                time.sleep(0.005)
            lags.append(time.monotonic() - published)
        assert local.pending == 0 and local.shipped >= 300
    print(f"\nnew model -> local ranker: {', '.join(f'{x * 1000:.0f} ms' for x in lags)}")
    assert max(lags) < 1.0


def test_the_model_follower_outlives_a_failure(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure the model's follower does not expect (a full disk while it writes a new
    model) is logged, and it carries on: it fetches the model again and serves it."""
    import service.local

    url = live_server.url
    config = httpx.get(f"{url}/personalizer/v1.0/configurations/service", headers=AUTH).json()
    config.update(rewardWaitTime="PT1S", modelExportFrequency="PT1S")
    httpx.put(
        f"{url}/personalizer/v1.0/configurations/service", json=config, headers=AUTH
    ).raise_for_status()
    key = httpx.post(f"{url}/loops/default/keys", headers=AUTH).json()["key"]
    failed: list[str] = []
    write_model = service.local.write_model  # type: ignore[attr-defined]

    def full_once(*args: Any, **kw: Any) -> str:
        if not failed:
            failed.append("model")
            raise OSError(28, "No space left on device")
        return write_model(*args, **kw)

    monkeypatch.setattr(service.local, "write_model", full_once)
    actions = [{"id": f"a{i}", "features": [{"t": i}]} for i in range(4)]
    with LocalRanker(url, key=key, ship_every=0.1) as local:
        for i in range(50):
            out = local.rank({"contextFeatures": [{"u": i % 5}], "actions": actions})
            local.reward(out["eventId"], 1.0)
        deadline = time.monotonic() + 30
        while local.served.model_id == "N/A":
            assert time.monotonic() < deadline, f"the follower stopped ({failed})"
            time.sleep(0.02)
    assert failed == ["model"]


def test_the_shipping_thread_writes_the_ranks_records_between_shipments(
    live_server: LiveServer,
) -> None:
    """A rank answers before its record is written: the shipping thread writes it within
    WRITE_EVERY seconds, long before it ships (here never before `close`)."""
    import service.local

    url = live_server.url
    key = httpx.post(f"{url}/loops/default/keys", headers=AUTH).json()["key"]
    actions = [{"id": f"a{i}", "features": [{"t": i}]} for i in range(4)]
    with LocalRanker(url, key=key, ship_every=3600) as local:
        for i in range(5):
            local.rank({"contextFeatures": [{"u": i}], "actions": actions})
        deadline = time.monotonic() + 10
        while local._made:
            assert time.monotonic() < deadline, "the shipping thread wrote nothing"
            time.sleep(service.local.WRITE_EVERY / 5)
        assert local._pending.records == 5 and local.shipped == 0
    assert local.shipped == 5


def test_a_server_with_a_ranker_attached_stops_without_waiting_out_its_long_poll(
    tmp_path: Path,
) -> None:
    """A closed ranker's long poll stays in flight (httpx cannot abort it) and the server waits
    for its requests when it stops: with 20 s polls it took 20 s to stop (the harness gives up
    there), now at most a poll's 5 s."""
    settings = make_settings(tmp_path / "data", learner={"tick_seconds": 0.05})
    with serving(settings) as server:
        key = httpx.post(f"{server.url}/loops/default/keys", headers=AUTH).json()["key"]
        ranker = LocalRanker(server.url, key=key)  # no model yet: its poll waits for one
        deadline = time.monotonic() + 10
        while not any(t.name == "dloop-local-model" and t.is_alive() for t in ranker._threads):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ranker.close()
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10


def test_records_wait_on_disk_while_the_server_is_away_and_arrive_in_order(
    tmp_path: Path,
) -> None:
    """The server stops: what the ranker decides goes on, its records move to the buffer
    directory; the server comes back on the same address and receives them, oldest first;
    an application restarted on the same buffer directory ships what its predecessor left."""
    settings = make_settings(tmp_path / "data", learner={"tick_seconds": 0.05})
    port = free_port()
    buffer = tmp_path / "buffer"
    actions = [{"id": f"a{i}", "features": [{"t": i}]} for i in range(3)]

    def decide(ranker: LocalRanker, prefix: str, n: int) -> list[str]:
        ids = [f"{prefix}-{i:03d}" for i in range(n)]
        for event in ids:
            ranker.rank({"eventId": event, "contextFeatures": [{"u": 1}], "actions": actions})
            ranker.reward(event, 1.0)
        return ids

    with serving(settings, port) as server:
        key = httpx.post(f"{server.url}/loops/default/keys", headers=AUTH).json()["key"]
        ranker = LocalRanker(server.url, key=key, background=False, buffer_dir=buffer)
        first = decide(ranker, "before", 5)
        assert ranker.flush() == 10
    # the server is away
    away = decide(ranker, "away", 40)
    with pytest.raises(httpx.HTTPError):
        ranker.flush()
    assert list(buffer.glob("*.ndjson")) and ranker.pending == 80
    later = decide(ranker, "later", 5)  # in memory, after what waits on disk
    with serving(settings, port) as server:
        assert ranker.flush() == 90 and ranker.pending == 0
        assert not list(buffer.glob("*.ndjson"))
    # the server is away again when the application stops: its successor ships what it left
    last = decide(ranker, "restart", 3)
    ranker.close()
    assert len(list(buffer.glob("*.ndjson"))) == 1
    with (
        serving(settings, port) as server,
        LocalRanker(server.url, key=key, background=False, buffer_dir=buffer) as again,
    ):
        assert again.pending == 6 and again.flush() == 6
        engine = create_engine(settings.database_url)
        query = text("SELECT event_id FROM decisions ORDER BY rowid")  # as ingested
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as conn:
                logged = [row[0] for row in conn.execute(query)]
            if len(logged) >= 53 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        engine.dispose()
    assert logged == first + away + later + last  # every decision, in the order decided


def test_a_local_ranker_ships_straight_to_the_events_topic(stack: Stack) -> None:
    """The production path: the ranker's records go to Kafka's events topic, keyed as the API
    replicas' publisher keys them, and `dloop join` and `dloop learn` take them from there."""
    cfg = stack.api("GET", "/personalizer/v1.0/configurations/service").json()
    cfg.update(modelExportFrequency="PT1S", rewardWaitTime="PT4S")
    assert stack.api("PUT", "/personalizer/v1.0/configurations/service", json=cfg).is_success
    key = stack.api("POST", "/loops/default/keys").json()["key"]
    kafka = {
        "bootstrap_servers": stack.env["DLOOP_KAFKA__BOOTSTRAP_SERVERS"],
        "topic": f"{stack.env['DLOOP_KAFKA__TOPIC_PREFIX']}.events",
    }
    before = stack.api("GET", "/personalizer/v1.0/model/properties").json()
    actions = [{"id": f"a{i}", "features": [{"t": i}]} for i in range(3)]
    with LocalRanker(stack.url, key=key, background=False, kafka=kafka) as ranker:
        for i in range(60):
            out = ranker.rank(
                {"eventId": f"k{i}", "contextFeatures": [{"u": i}], "actions": actions}
            )
            ranker.reward(f"k{i}", 1.0 if out["rewardActionId"] == "a1" else 0.0)
        assert ranker.flush() == 120 and ranker.pending == 0
    joins = select(func.count()).select_from(Joined).where(Joined.event_id.like("k%"))
    wait_for(lambda: count(stack.db_url, joins) == 60, 60, "the joins")
    wait_for(
        lambda: (
            stack.api("GET", "/personalizer/v1.0/model/properties").json()["lastModifiedTime"]
            != before["lastModifiedTime"]
        ),
        60,
        "a model that learned them",
    )
