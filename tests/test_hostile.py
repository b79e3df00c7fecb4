"""Hostile input against a real `dloop up` process: no request may crash it or stop learning.

A crash in native code (VW) kills the process that runs it, so these tests drive a server in
a subprocess and judge it from outside: it answers, it keeps learning every loop, and what it
could not use is in the dead letters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import create_engine, select, text

from service.storage.models import DeadLetter
from tests.conftest import free_port

KEY = "hostile-test-admin-key-0123456789abcdef"
HEADERS = {"Ocp-Apim-Subscription-Key": KEY}
ACTIONS = [{"id": f"a{i}", "features": [{"topic": f"t{i}"}]} for i in range(3)]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        assert self.alive(), f"the server died (exit code {self.process.returncode})"
        kw.setdefault("headers", HEADERS)
        return httpx.request(method, self.url + path, timeout=30, **kw)

    def rank(self, body: dict[str, Any], loop: str | None = None) -> httpx.Response:
        prefix = f"/loops/{loop}" if loop else ""
        return self.call("POST", f"{prefix}/personalizer/v1.0/rank", json=body)

    def reward(self, event_id: str, value: float, loop: str | None = None) -> None:
        prefix = f"/loops/{loop}" if loop else ""
        r = self.call(
            "POST", f"{prefix}/personalizer/v1.0/events/{event_id}/reward", json={"value": value}
        )
        assert r.status_code == 204, r.text

    def configure(self, loop: str | None = None, **changes: Any) -> None:
        path = (f"/loops/{loop}" if loop else "") + "/personalizer/v1.0/configurations/service"
        cfg = self.call("GET", path).json()
        cfg.update(changes)
        assert self.call("PUT", path, json=cfg).status_code == 200

    def event(self, event_id: str, loop: str | None = None) -> dict[str, Any]:
        prefix = f"/loops/{loop}" if loop else ""
        r = self.call("GET", f"{prefix}/personalizer/v1.0/events/{event_id}")
        return r.json() if r.status_code == 200 else {}

    def examples(self, loop: str = "default") -> int:
        for line in self.call("GET", "/metrics").text.splitlines():
            if line.startswith(f'dloop_model_examples{{loop="{loop}"}}'):
                return int(float(line.split()[-1]))
        return 0

    def dead_letters(self) -> list[DeadLetter]:
        engine = create_engine(f"sqlite:///{self.data_dir / 'dloop.db'}")
        try:
            with engine.connect() as conn:
                return list(conn.execute(select(DeadLetter)).all())  # type: ignore[arg-type]
        finally:
            engine.dispose()


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """`dloop up` in a process of its own; a test may add settings (indirect parametrize)."""
    port = free_port()
    data_dir = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DLOOP_")},
        "DLOOP_API_KEY": KEY,
        "DLOOP_LEARNER__TICK_SECONDS": "0.05",
        **getattr(request, "param", {}),
    }
    with open(tmp_path / "server.err", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "up", "--port", str(port), "--data-dir", data_dir],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    s = Server(f"http://127.0.0.1:{port}", data_dir, process)

    def up() -> bool:
        assert s.alive(), (tmp_path / "server.err").read_text()
        try:
            return httpx.get(s.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, what="the server to start")
    try:
        yield s
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def body(event_id: str, context: list[dict[str, Any]], actions: Any = None) -> dict[str, Any]:
    return {"eventId": event_id, "contextFeatures": context, "actions": actions or ACTIONS}


def serve_a_model(s: Server, loop: str | None = None) -> None:
    """Give the loop a served model (a blank one, exported and imported again)."""
    prefix = (f"/loops/{loop}" if loop else "") + "/personalizer/v1.0/model"
    model = s.call("GET", prefix).content
    assert s.call("PUT", prefix, content=model).status_code == 204


RESERVED = [
    [{"__aid": 0}],
    [{"user": {"__aid": 7}}],
    [{"_multi": []}],
    [{"_labelIndex": 7}],
    [{"_label_cost": 1, "_text": "a b c", "_tag": "x", "_slots": [], "_inc": [0]}],
    [{"deep": {"deeper": {"_multi": [{"x": 1}], "__aid": 1}}}],
]


@pytest.mark.parametrize("context", RESERVED)
def test_reserved_keys_are_ignored_when_a_model_serves(server: Server, context: Any) -> None:
    serve_a_model(server)
    r = server.rank(body("e1", context))
    assert r.status_code == 201, r.text
    actions = [{"id": "x", "features": [*context, {"ok": 1}]}, {"id": "y", "features": [{"ok": 1}]}]
    r = server.rank(body("e2", [{"ok": 1}], actions))
    assert r.status_code == 201, r.text
    # An action left with no feature of its own once they are dropped is a clear 400.
    actions = [{"id": "x", "features": context}, {"id": "y", "features": [{"ok": 1}]}]
    r = server.rank(body("e4", [{"ok": 1}], actions))
    assert r.status_code == 400 and "actions[0].features" in r.text, r.text
    assert server.rank(body("e3", [{"time": "noon"}])).status_code == 201
    logged = server.event("e1")
    assert logged and logged["ranking"]  # logged like any decision ...
    assert server.alive()


def test_a_reserved_key_neither_crashes_the_learner_nor_stops_other_loops(server: Server) -> None:
    """`__aid` used to kill the embedded learner on the joined row (and again after every
    restart); `_multi`/`_labelIndex` made every worker pass raise, so no loop learned."""
    assert server.call("PUT", "/loops/other", json={"kind": "cb"}).status_code == 201
    for loop in (None, "other"):
        server.configure(loop, rewardWaitTime="PT1S", modelExportFrequency="PT1S")
    for i, context in enumerate(RESERVED):
        assert server.rank(body(f"bad{i}", context)).status_code == 201
        server.reward(f"bad{i}", 1.0)
    for i in range(5):
        assert server.rank(body(f"good{i}", [{"time": "noon"}]), loop="other").status_code == 201
        server.reward(f"good{i}", 1.0, loop="other")
    wait_for(lambda: server.examples("other") == 5, what="the other loop to learn")
    wait_for(lambda: server.examples() == len(RESERVED), what="the default loop to learn")
    assert server.alive()
    # the features VW saw: the reserved keys were dropped (Personalizer ignores `_` keys)
    for i in range(len(RESERVED)):
        logged = server.event(f"bad{i}")
        assert logged["joined"] and logged["learnable"]


def insert_poison(s: Server, line: str, *, loop: str = "default", event_id: str = "p1") -> None:
    """A joined row as an older or compromised writer could have left it (not through the
    API, which would have cleaned it)."""
    engine = create_engine(f"sqlite:///{s.data_dir / 'dloop.db'}")
    now = time.time()
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO joined (loop, event_id, created_at, joined_at, mode, learnable,"
                    " reward, rewarded, imitated, line, published)"
                    " VALUES (:loop, :id, :t, :t, 'Online', 1, 1, 1, 0, :line, 0)"
                ),
                {"loop": loop, "id": event_id, "t": now, "line": line},
            )
    finally:
        engine.dispose()


def dsjson(context: list[dict[str, Any]], event_id: str = "p1") -> str:
    c = {
        "FromUrl": context,
        "_multi": [
            {"_tag": a["id"], "i": {"constant": 1, "id": a["id"]}, "j": a["features"]}
            for a in ACTIONS
        ],
    }
    head = {"_label_cost": -1, "_label_probability": 0.5, "_label_Action": 1, "_labelIndex": 0}
    tail = {
        "o": [],
        "Timestamp": "2026-12-02T00:00:00.000Z",
        "Version": "1",
        "EventId": event_id,
        "a": [1, 2, 3],
        "c": c,
        "p": [0.5, 0.25, 0.25],
        "VWState": {"m": "N/A"},
    }
    return orjson.dumps({**head, **tail}).decode()


@pytest.mark.parametrize(
    ("context", "why"),
    [
        ([{"__aid": 0}], "native crash"),  # VW 9.11.9 segfaults parsing it
        ([{"_multi": []}], "Vowpal Wabbit"),  # VW raises
    ],
)
def test_a_joined_row_that_breaks_vw_is_dead_lettered_and_learning_goes_on(
    server: Server, context: Any, why: str
) -> None:
    server.configure(rewardWaitTime="PT1S", modelExportFrequency="PT1S")
    assert server.rank(body("before", [{"time": "noon"}])).status_code == 201
    server.reward("before", 1.0)
    wait_for(lambda: server.examples() == 1, what="the first event to be learned")
    insert_poison(server, dsjson(context))
    for i in range(5):
        assert server.rank(body(f"after{i}", [{"time": "noon"}])).status_code == 201
        server.reward(f"after{i}", 1.0)
    wait_for(lambda: server.examples() == 6, what="learning to go on past the poison")
    assert server.alive()
    letters = [d for d in server.dead_letters() if "p1" in d.record]
    assert len(letters) == 1 and why in letters[0].reason, letters


# ---- in-process: the embedded worker's passes --------------------------------------------------


def test_a_loop_that_cannot_learn_is_reported_and_the_others_learn(harness: Any) -> None:
    from service.storage.models import Loop as LoopRow
    from tests.conftest import AUTH

    h = harness
    assert h.client.put("/loops/broken", json={}, headers=AUTH).status_code == 201
    for prefix in ("", "/loops/broken"):
        path = f"{prefix}/personalizer/v1.0/configurations/service"
        cfg = h.client.get(path, headers=AUTH).json()
        cfg.update(rewardWaitTime="PT1S", modelExportFrequency="PT1S")
        assert h.client.put(path, json=cfg, headers=AUTH).status_code == 200
    # A policy VW refuses, as a database edited by hand (or an older dloop) could hold.
    with h.dloop.sessions.begin() as session:
        row = session.get(LoopRow, "broken")
        row.policy = {"name": "bad", "arguments": "--cb_explore_adf --no_such_option 3"}
    with h.dloop.sessions() as session:
        h.dloop.registry.load(session)
    for prefix in ("", "/loops/broken"):
        for i in range(3):
            r = h.client.post(
                f"{prefix}/personalizer/v1.0/rank", json=body(f"e{i}", [{"a": 1}]), headers=AUTH
            )
            assert r.status_code == 201, r.text
            h.client.post(
                f"{prefix}/personalizer/v1.0/events/e{i}/reward", json={"value": 1}, headers=AUTH
            )
    h.clock.advance(5)
    h.work()
    assert h.dloop.registry.loops["default"].model_id != "N/A"  # the healthy loop learned
    ready = h.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    failing = ready.json()["failingLoops"]
    assert [f["loop"] for f in failing] == ["broken"] and "no_such_option" in failing[0]["error"]
    metrics = h.client.get("/metrics", headers=AUTH).text
    assert 'dloop_learner_failing{loop="broken"} 1' in metrics
    # it backs off: passes right after skip it, a later one tries it again
    h.work()
    assert h.dloop.worker is not None and h.dloop.worker.failing["broken"].failures == 1
    h.clock.advance(10)
    h.work()
    assert h.dloop.worker.failing["broken"].failures == 2


def test_a_loop_deleted_during_a_pass_stops_nothing(
    harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.storage import store
    from tests.conftest import AUTH

    h = harness
    assert h.client.put("/loops/gone", json={}, headers=AUTH).status_code == 201
    for prefix in ("", "/loops/gone"):
        r = h.client.post(
            f"{prefix}/personalizer/v1.0/rank", json=body("e1", [{"a": 1}]), headers=AUTH
        )
        assert r.status_code == 201
        h.client.post(
            f"{prefix}/personalizer/v1.0/events/e1/reward", json={"value": 1}, headers=AUTH
        )
    next_join_at = store.next_join_at

    def join_then_delete(session: Any, *, loop: str, **kw: Any) -> float | None:
        at = next_join_at(session, loop=loop, **kw)
        if loop == "gone":  # the API deletes the loop while the worker is inside its pass
            assert h.client.delete("/loops/gone", headers=AUTH).status_code == 204
        return at

    monkeypatch.setattr(store, "next_join_at", join_then_delete)
    h.clock.advance(700)
    h.work()
    with h.dloop.sessions() as session:
        assert store.get_checkpoint(session, loop="default") is not None
    assert "gone" not in h.dloop.registry.loops


@pytest.mark.parametrize(
    "context",
    [[{"é": [1]}], [{"ns": {"€": {"x": 1}}}], [{"😀": {}}]],
    ids=["array", "deep", "emoji"],
)
def test_a_namespace_named_past_ascii_is_a_400_not_a_crash(server: Server, context: Any) -> None:
    """Found by the feature fuzzer (tests/test_sandbox.py): VW 9.11.9 segfaults on a namespace
    whose name starts with a non-ASCII character."""
    for serve in (False, True):
        if serve:
            serve_a_model(server)
        r = server.rank(body(f"e{serve}", context))
        assert r.status_code == 400, r.text
        assert "namespace names must start with an ASCII character" in r.text
    assert server.rank(body("fine", [{"é": 1, "ns": {"x": "ü"}}])).status_code == 201
    assert server.alive()


@pytest.mark.parametrize(
    "server",
    [{"DLOOP_LIMITS__MAX_CONNECTIONS": "4", "DLOOP_LIMITS__KEEP_ALIVE": "1"}],
    indirect=True,
)
def test_connections_are_limited_and_idle_ones_closed(server: Server) -> None:
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
    try:
        r = httpx.get(server.url + "/healthz", timeout=10)
        assert r.status_code == 503, r.text  # the limit is reached: refused, not queued
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: httpx.get(server.url + "/healthz", timeout=10).status_code == 200)
    # a keep-alive connection left idle is closed by the server after DLOOP_LIMITS__KEEP_ALIVE
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while not response.endswith(b'{"status":"ok"}'):  # head and body may come apart
            chunk = s.recv(4096)
            assert chunk, response
            response += chunk
        assert response.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert s.recv(4096) == b""  # closed by the server
        assert time.monotonic() - started < 5
