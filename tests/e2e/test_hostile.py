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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from service.storage.models import DeadLetter
from tests.support.bodies import body
from tests.support.production import wait_for
from tests.support.records import dsjson
from tests.support.services import free_port

KEY = "hostile-test-admin-key-0123456789abcdef"
HEADERS = {"Ocp-Apim-Subscription-Key": KEY}


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


@pytest.mark.slow
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
    # logged like any decision (once the learner, which yields to serving, has ingested it)
    logged = wait_for(lambda: server.event("e1"), what="e1 logged")
    assert logged["ranking"]
    assert server.alive()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "context",
    [[{"é": [1]}], [{"ns": {"€": {"x": 1}}}], [{"😀": {}}]],
    ids=["array", "deep", "emoji"],
)
def test_a_namespace_named_past_ascii_is_a_400_not_a_crash(server: Server, context: Any) -> None:
    """Found by the feature fuzzer (tests/unit/learners/test_sandbox.py): VW 9.11.9 segfaults on
    a namespace whose name starts with a non-ASCII character."""
    for serve in (False, True):
        if serve:
            serve_a_model(server)
        r = server.rank(body(f"e{serve}", context))
        assert r.status_code == 400, r.text
        assert "namespace names must start with an ASCII character" in r.text
    assert server.rank(body("fine", [{"é": 1, "ns": {"x": "ü"}}])).status_code == 201
    assert server.alive()


@pytest.mark.slow
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
