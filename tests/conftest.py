"""Fixtures for every test: a fake clock, the app under TestClient, a live server, a fresh
Postgres database, the session's broker, and a directory of files no policy may touch. What
they build lives in tests/support/ (test modules import from there, never from here)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.harness import FakeClock, Harness, LiveServer, make_settings, serving
from tests.support.services import Broker, free_port, postgres_database, start_tansu

# The port of this process's broker (kafka_broker), chosen before any test runs so that the
# warning filter below can name it.
BROKER_PORT = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    """Warnings are errors (pyproject.toml), a socket left to the garbage collector included,
    but for one case: kafka-python 3.0.12 leaks the socket of a connection it is still opening
    when its client closes (net/inet.py: the socket is never closed when the connecting coroutine
    is cancelled), so any test using Kafka could fail by the collector's timing. Sockets to this
    process's own broker are exempt; every other leaked socket still fails the test."""
    port = free_port()
    config.stash[BROKER_PORT] = port
    config.addinivalue_line(
        "filterwarnings",
        rf"ignore:unclosed <socket\.socket [^>]*raddr=\('127\.0\.0\.1', {port}\)>:ResourceWarning",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def harness(tmp_path: Path, clock: FakeClock) -> Iterator[Harness]:
    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings, clock=clock, run_worker=False)) as client:
        yield Harness(client, clock)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A real uvicorn server with the embedded worker (real clock) on a free port."""
    with serving(make_settings(tmp_path / "live", learner={"tick_seconds": 0.05})) as server:
        yield server


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database (fails, never skips, when Postgres is down)."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def kafka_broker(pytestconfig: pytest.Config) -> Iterator[Broker]:
    """A real Kafka-protocol broker (Tansu, in memory) for the session; fails if it can't run."""
    try:
        address, process = start_tansu(pytestconfig.stash[BROKER_PORT])
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield Broker(address, process)
    finally:
        process.send_signal(18)  # in case a test left it paused
        process.terminate()
        process.wait(10)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An existing file with known bytes and a path that does not exist, in an otherwise empty
    directory that is also the working directory (so a file VW names relative to it would show
    up too). tests.support.files.assert_untouched checks that nothing touched them."""
    directory = tmp_path / "files"
    directory.mkdir()
    monkeypatch.chdir(directory)
    existing = directory / "precious.vw"
    existing.write_bytes(b"precious bytes")
    return existing, directory / "fresh.vw"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs in two steps: DLOOP_SERIAL=skip runs every test but those marked
    `serial` (they restart Postgres, which every other test shares) in two processes, then
    DLOOP_SERIAL=only runs those alone. Unset: everything, as selected."""
    step = os.environ.get("DLOOP_SERIAL")
    if step not in ("skip", "only"):
        return
    keep = [i for i in items if (i.get_closest_marker("serial") is not None) == (step == "only")]
    gone = [i for i in items if i not in keep]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep
