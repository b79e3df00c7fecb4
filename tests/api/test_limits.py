"""What a request may cost: bodies counted as they arrive, keys checked before any body is read,
slow bodies cut, per-key rate limits, feature caps, the retry cache's bound."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.client import Client, DloopError
from tests.support.harness import (
    ADMIN_KEY,
    AUTH,
    FakeClock,
    Harness,
    LiveServer,
    make_settings,
    serving,
)

MB = 1 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    """A real uvicorn server in this process (so tracemalloc sees what it allocates)."""
    with serving(make_settings(tmp_path / "live", limits={"body_timeout": 1.0})) as live:
        yield live


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def peak_while(call: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/personalizer/v1.0/rank", AUTH, 413),  # hot path, chunked
        ("POST", "/personalizer/v1.0/rank", {}, 401),  # no key: nothing is read
        ("PUT", "/personalizer/v1.0/configurations/service", {}, 401),  # a Body() route
        ("PUT", "/personalizer/v1.0/configurations/service", AUTH, 413),
        ("PUT", "/loops/model", AUTH, 413),  # not the model import route
        ("PUT", "/loops/x/personalizer/v1.0/evaluations/e", {}, 401),
    ],
)
def test_chunked_bodies_are_counted_as_they_arrive(
    server: LiveServer, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    def send() -> httpx.Response:
        return httpx.request(
            method, server.url + path, content=chunks(40 * MB), headers=headers, timeout=60
        )

    r, peak = peak_while(send)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] in ("PayloadSizeExceeded", "Unauthorized")
    assert peak < 8 * MB, f"the server held {peak / MB:.0f} MiB of a body it should refuse"


def test_a_declared_length_over_the_limit_is_refused_on_any_path(server: LiveServer) -> None:
    for path in ("/loops/model", "/loops/x/personalizer/v1.0/model/"):
        r = httpx.put(
            server.url + path,
            content=b"x" * (300 * 1024),
            headers={**AUTH, "content-type": "application/json"},
        )
        assert r.status_code == 413, (path, r.text)


def test_the_model_import_route_takes_big_bodies(server: LiveServer) -> None:
    model = httpx.get(server.url + "/personalizer/v1.0/model", headers=AUTH).content
    padded = model + b"\0" * (400 * 1024)  # over the general limit, under the model cap
    r = httpx.put(server.url + "/personalizer/v1.0/model", content=padded, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidModelImportFormat"


def test_a_slow_body_is_cut(server: LiveServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /personalizer/v1.0/rank HTTP/1.1\r\nHost: x\r\n"
            + f"Ocp-Apim-Subscription-Key: {ADMIN_KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        answer = s.recv(4096)  # nothing more is sent: the server gives up after body_timeout
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"RequestTimeout" in answer


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Harness]:
    clock = FakeClock()
    settings = make_settings(tmp_path / "data", limits={"rate_per_key": 5, "burst_per_key": 10})
    with TestClient(create_app(settings, clock=clock, run_worker=False)) as client:
        yield Harness(client, clock)


def test_each_key_is_rate_limited(limited: Harness) -> None:
    c = limited.client
    key = c.post("/loops/default/keys", headers=AUTH).json()["key"]
    client_auth = {"Ocp-Apim-Subscription-Key": key}
    body = {"contextFeatures": [{"a": 1}], "actions": [{"id": "x", "features": [{"f": 1}]}]}
    codes = [c.post("/personalizer/v1.0/rank", json=body, headers=client_auth) for _ in range(12)]
    assert [r.status_code for r in codes] == [201] * 10 + [429] * 2
    limited_answer = codes[-1]
    assert limited_answer.json()["error"]["code"] == "TooManyRequests"
    assert int(limited_answer.headers["retry-after"]) >= 1
    # another key has its own budget
    assert c.get("/personalizer/v1.0/configurations/service", headers=AUTH).status_code == 200
    limited.clock.advance(1.0)  # 5 more a second
    codes = [c.post("/personalizer/v1.0/rank", json=body, headers=client_auth) for _ in range(6)]
    assert [r.status_code for r in codes] == [201] * 5 + [429]


@pytest.fixture
def small_cache(tmp_path: Path) -> Iterator[Harness]:
    clock = FakeClock()
    settings = make_settings(tmp_path / "data", dedup_cache_bytes=64 * 1024)
    with TestClient(create_app(settings, clock=clock, run_worker=False)) as client:
        yield Harness(client, clock)


def test_the_retry_cache_is_bounded_in_bytes_across_loops(small_cache: Harness) -> None:
    h = small_cache
    assert h.client.put("/loops/other", json={}, headers=AUTH).status_code == 201
    actions = [{"id": f"a{i}", "features": [{"f": i}]} for i in range(20)]
    for i in range(400):  # about 1 KB of response each, over two loops
        for prefix in ("", "/loops/other"):
            body = {"eventId": f"e{i}", "contextFeatures": [{"a": 1}], "actions": actions}
            h.rank(body, f"{prefix}/personalizer/v1.0/rank")
    cache = h.dloop.retries
    assert cache.bytes <= 64 * 1024
    assert 0 < len(cache) < 800
    # the newest answers are still remembered, byte for byte
    body = {"eventId": "e399", "contextFeatures": [{"a": 1}], "actions": actions}
    again = h.client.post("/loops/other/personalizer/v1.0/rank", json=body, headers=AUTH)
    assert again.status_code == 201
    assert h.dloop.retries.get("other", "e399") is not None
    assert h.dloop.retries.get("default", "e0") is None  # the oldest went first


def many_features(n: int, namespaces: int = 40) -> list[dict[str, Any]]:
    per = n // namespaces
    return [{f"n{k}": {f"f{i}": i + 1 for i in range(per)}} for k in range(namespaces)]


def test_too_many_features_is_400(harness: Harness) -> None:
    body = {
        "contextFeatures": many_features(20_000),
        "actions": [{"id": "a", "features": [{"x": 1}]}],
    }
    r = harness.client.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
    assert r.status_code == 400 and "at most 2000" in r.json()["error"]["message"]
    body["contextFeatures"] = [{"ns": {f"f{i}": 1 for i in range(600)}}]
    r = harness.client.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
    assert r.status_code == 400 and "more than 500 features in one object" in r.text


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[LiveServer]:
    """Feature caps lifted and a short deadline, so one rank can overrun it."""
    settings = make_settings(
        tmp_path / "live",
        limits={"max_features": 100_000, "max_namespace_features": 100_000},
        sandbox={"rank_timeout": 0.5},
    )
    with serving(settings) as live:
        yield live


def _expensive_rank(url: str) -> dict[str, Any]:
    """A model on the server (so rank runs VW's real path), and a rank body that takes VW
    seconds: 20,000 context features crossed with 50 actions."""
    model = httpx.get(url + "/personalizer/v1.0/model", headers=AUTH).content
    assert httpx.put(url + "/personalizer/v1.0/model", content=model, headers=AUTH).is_success
    return {
        "contextFeatures": many_features(20_000),
        "actions": [{"id": f"a{i}", "features": [{"x": i + 1}]} for i in range(50)],
    }


def test_an_expensive_rank_blocks_nobody_and_is_cut_at_its_deadline(
    slow_server: LiveServer,
) -> None:
    url = slow_server.url
    body = _expensive_rank(url)
    answer: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: answer.append(
            httpx.post(url + "/personalizer/v1.0/rank", json=body, headers=AUTH, timeout=60)
        )
    )
    worker.start()
    health = []
    while worker.is_alive():
        started = time.perf_counter()
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        health.append(time.perf_counter() - started)
    worker.join()
    r = answer[0]
    assert r.status_code == 400, r.text
    assert "took longer than 0.5 s" in r.json()["error"]["message"]
    assert health and max(health) < 0.25, f"/healthz waited {max(health):.2f} s"
    # the ranking process was replaced and ranks again
    small = {"contextFeatures": [{"a": 1}], "actions": [{"id": "x", "features": [{"f": 1}]}]}
    r = httpx.post(url + "/personalizer/v1.0/rank", json=small, headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text


def test_a_rank_cut_at_its_deadline_is_tried_again_when_sent_again(
    slow_server: LiveServer,
) -> None:
    """A deadline is missed as often because the machine is busy as because of the request:
    the same request sent again (a client's retry, or every identical request without an
    eventId) is ranked again, not refused from memory as a request that crashed VW is."""
    url = slow_server.url
    body = _expensive_rank(url)
    for _ in range(2):
        r = httpx.post(url + "/personalizer/v1.0/rank", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 400 and "took longer" in r.json()["error"]["message"], r.text
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    assert "dloop_ranker_timeouts 2" in metrics and "dloop_ranker_refused 0" in metrics


def test_deeply_nested_features_are_400(harness: Harness) -> None:
    """orjson cannot write past 254 levels: this used to be a 500."""
    deep: dict[str, Any] = {"leaf": 1}
    for i in range(300):
        deep = {f"n{i}": deep}
    for where in ("contextFeatures", "actions"):
        body: dict[str, Any] = {
            "contextFeatures": [{"a": 1}],
            "actions": [{"id": "x", "features": [{"f": 1}]}],
        }
        if where == "actions":
            body["actions"][0]["features"] = [deep]
        else:
            body["contextFeatures"] = [deep]
        r = harness.client.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
        assert r.status_code == 400, r.text
        assert "nested more than 16 deep" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/personalizer/rank%0A", 404),
        ("GET", "/personalizer/evaluations/%0A", 404),
        ("PUT", "/personalizer/featureImportances/x%0A", 404),
        ("POST", "/personalizer/v1.0/events/a%0A/reward", 400),  # no control characters in ids
    ],
)
def test_a_newline_in_the_path_is_part_of_the_path(
    harness: Harness, method: str, path: str, status: int
) -> None:
    """`$` matched before a trailing newline: /rank\\n was served as a rank, /evaluations/\\n
    listed the evaluations."""
    body = {"value": 1} if "reward" in path else {"name": "n"}
    r = harness.client.request(method, path, json=body, headers=AUTH)
    assert r.status_code == status, r.text


def test_a_newline_in_the_path_does_not_skip_the_key(harness: Harness) -> None:
    r = harness.client.post("/loops/x/personalizer/events/%0A/activate")
    assert r.status_code == 401, r.text


def test_tiny_exploration_is_greedy_not_an_error(harness: Harness) -> None:
    """explorationPercentage 1e-300 made SquareCB's gamma_scale 2e300, which VW refuses."""
    cfg = harness.configure(explorationPercentage=1e-300)
    assert cfg["explorationPercentage"] == 1e-300
    r = harness.client.get("/personalizer/v1.0/model", headers=AUTH)
    assert r.status_code == 200


def test_the_client_waits_out_a_rate_limit(limited: Harness) -> None:
    """service.client.Client (what `dloop simulate` drives with) sleeps as a 429's Retry-After
    says and sends the request again, instead of failing a fast run; with no retries left it
    raises the 429."""
    key = limited.client.post("/loops/default/keys", headers=AUTH).json()["key"]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        limited.clock.advance(seconds)

    dl = Client(key=key, http=limited.client, sleep=sleep)
    for i in range(16):  # a burst of 10, then 5 a second
        dl.rank([{"a": 1}], [{"id": "x", "features": [{"f": 1}]}], event_id=f"e{i}")
    assert slept == [1.0, 1.0]
    impatient = Client(key=key, http=limited.client, retries=0, sleep=sleep)
    with pytest.raises(DloopError) as caught:
        for i in range(16, 30):
            impatient.rank([{"a": 1}], [{"id": "x", "features": [{"f": 1}]}], event_id=f"e{i}")
    assert caught.value.status == 429 and slept == [1.0, 1.0]
