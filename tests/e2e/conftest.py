"""The `stack` fixture: `dloop serve` (2 workers), `dloop join` and `dloop learn` as processes on
the session's broker and a fresh Postgres database."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.storage.migrate import upgrade
from tests.support.production import KEY, Stack
from tests.support.services import Broker, free_port


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
    s.start("serve", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2")
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
