"""The app under test, in this process: a fake clock, migrated settings, the TestClient harness
and a live uvicorn server (the fixtures in tests/conftest.py build them)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from fastapi.testclient import TestClient

from service.api.state import Dloop
from service.app import create_app
from service.core.settings import Settings, load_settings
from service.storage.migrate import upgrade
from tests.support.services import free_port

# DLOOP_API_KEY must be at least 32 characters (service.settings).
ADMIN_KEY = "test-admin-key-0123456789abcdefghij"
AUTH = {"Ocp-Apim-Subscription-Key": ADMIN_KEY}


class FakeClock:
    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    overrides.setdefault("api_key", ADMIN_KEY)
    # Tests drive thousands of calls on a fake clock that does not move: no per-key rate limit
    # unless a test sets one (tests/api/test_limits.py).
    overrides["limits"] = {"rate_per_key": 0, **overrides.get("limits", {})}
    settings = load_settings(data_dir=data_dir, **overrides)
    data_dir.mkdir(parents=True, exist_ok=True)
    fresh = data_dir / "dloop.db"
    if settings.database_url == f"sqlite:///{fresh.resolve()}" and not fresh.exists():
        shutil.copyfile(_migrated_sqlite(), fresh)
    else:
        upgrade(settings.database_url)
    return settings


@cache
def _migrated_sqlite() -> Path:
    """A SQLite database migrated to head, once per test process: a new one is a copy of it
    (Alembic takes 0.3 s or more per database, and hundreds of tests start with one)."""
    path = Path(tempfile.mkdtemp(prefix="dloop-migrated-")) / "dloop.db"
    upgrade(f"sqlite:///{path}")
    return path


@dataclass
class Harness:
    """The app in-process: `client` speaks HTTP to it, `work()` runs the worker to idle."""

    client: TestClient
    clock: FakeClock

    @property
    def dloop(self) -> Dloop:
        d: Dloop = self.client.app.state.dloop  # type: ignore[attr-defined]
        return d

    def work(self) -> None:
        worker = self.dloop.worker
        assert worker is not None
        while worker.run_once():
            pass

    def rank(self, body: dict[str, Any], path: str = "/personalizer/v1.0/rank") -> dict[str, Any]:
        r = self.client.post(path, json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    def reward(self, event_id: str, value: float) -> None:
        r = self.client.post(
            f"/personalizer/v1.0/events/{event_id}/reward", json={"value": value}, headers=AUTH
        )
        assert r.status_code == 204, r.text

    def configure(self, **changes: Any) -> dict[str, Any]:
        cfg = self.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
        cfg.update(changes)
        r = self.client.put("/personalizer/v1.0/configurations/service", json=cfg, headers=AUTH)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


def joined(h: Harness, event_id: str) -> dict[str, Any] | None:
    """The joined line of an event (of any loop), None while it is not joined."""
    from service.storage.models import Joined

    with h.dloop.sessions() as s:
        row = s.query(Joined).filter_by(event_id=event_id).one_or_none()
        return None if row is None else orjson.loads(row.line)


@dataclass
class LiveServer:
    url: str
    settings: Settings


@contextmanager
def serving(settings: Settings, port: int | None = None) -> Iterator[LiveServer]:
    """A real uvicorn server in this process (real clock) on a free port (or `port`)."""
    port = port if port is not None else free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", settings)
    finally:
        server.should_exit = True
        thread.join(20)
