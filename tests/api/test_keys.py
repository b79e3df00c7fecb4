"""API keys through the API (service.api.auth, routes/keys.py): the header spellings, the
environment key, admin key management, expiry, client keys on their loop only, and keys changed
offline reaching a running server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from learners.dsjson import timestamp
from service.app import create_app
from tests.support.bodies import rank_body
from tests.support.harness import ADMIN_KEY, AUTH, FakeClock, Harness, LiveServer, make_settings

RANK = {
    "contextFeatures": [{"time": "morning"}],
    "actions": [{"id": "a", "features": [{"f": 1}]}, {"id": "b", "features": [{"f": 2}]}],
}
KEY_A = "env-key-a-0123456789abcdefghijklmnop"
KEY_B = "env-key-b-0123456789abcdefghijklmnop"


def headers(key: str) -> dict[str, str]:
    return {"Ocp-Apim-Subscription-Key": key}


def can_rank(client: TestClient, key: str) -> int:
    return client.post("/personalizer/v1.0/rank", json=RANK, headers=headers(key)).status_code


def test_a_new_environment_key_replaces_the_old_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with TestClient(create_app(make_settings(data, api_key=KEY_A), run_worker=False)) as client:
        assert can_rank(client, KEY_A) == 201
        kept = client.post("/keys", json={"label": "ops"}, headers=headers(KEY_A)).json()["key"]
    with TestClient(create_app(make_settings(data, api_key=KEY_B), run_worker=False)) as client:
        assert can_rank(client, KEY_A) == 401
        assert can_rank(client, KEY_B) == 201
        assert can_rank(client, kept) == 201  # keys made through the API stay
        listed = client.get("/keys", headers=headers(KEY_B)).json()["value"]
        assert sorted(k["source"] for k in listed) == ["api", "env"]
    # Starting again with the same key (as every replica does) changes nothing.
    with TestClient(create_app(make_settings(data, api_key=KEY_B), run_worker=False)) as client:
        assert len(client.get("/keys", headers=headers(KEY_B)).json()["value"]) == 2


def test_admin_keys_are_listed_created_and_revoked(harness: Harness) -> None:
    r = harness.client.post("/keys", json={"label": "deploy bot"}, headers=AUTH)
    assert r.status_code == 201
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    assert created["role"] == "admin" and created["label"] == "deploy bot"
    assert created["source"] == "api" and created["expiresTime"] is None
    assert can_rank(harness.client, created["key"]) == 201
    r = harness.client.get("/keys", headers=headers(created["key"]))
    assert r.status_code == 200
    listed = r.json()["value"]
    assert [k["source"] for k in listed] == ["env", "api"]
    for doc in listed:
        assert "key" not in doc and not any("hash" in field for field in doc)
        assert set(doc) == {"id", "role", "label", "source", "createdTime", "expiresTime"}
    assert harness.client.delete(f"/keys/{created['id']}", headers=AUTH).status_code == 204
    assert can_rank(harness.client, created["key"]) == 401
    assert harness.client.delete(f"/keys/{created['id']}", headers=AUTH).status_code == 404


def test_the_last_valid_admin_key_cannot_be_revoked(harness: Harness) -> None:
    env_id = harness.client.get("/keys", headers=AUTH).json()["value"][0]["id"]
    r = harness.client.delete(f"/keys/{env_id}", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "Conflict"
    spare = harness.client.post("/keys", headers=AUTH).json()
    expiring = harness.client.post("/keys", json={"expiresInDays": 1}, headers=AUTH).json()
    assert harness.client.delete(f"/keys/{env_id}", headers=AUTH).status_code == 204
    assert can_rank(harness.client, AUTH["Ocp-Apim-Subscription-Key"]) == 401
    harness.clock.advance(86_401)
    # The expiring key no longer counts: `spare` is the last valid one.
    r = harness.client.delete(f"/keys/{spare['id']}", headers=headers(spare["key"]))
    assert r.status_code == 409
    r = harness.client.delete(f"/keys/{expiring['id']}", headers=headers(spare["key"]))
    assert r.status_code == 204


def test_expired_keys_are_refused_like_unknown_ones(harness: Harness) -> None:
    clock: FakeClock = harness.clock
    admin = harness.client.post("/keys", json={"expiresInDays": 2}, headers=AUTH).json()
    expires = timestamp(clock.now + 3600)
    body = {"label": "web", "expiresAt": expires}
    r = harness.client.post("/loops/default/keys", json=body, headers=AUTH)
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    client = r.json()
    assert client["label"] == "web" and client["expiresTime"] == expires
    assert can_rank(harness.client, client["key"]) == 201
    clock.advance(3601)
    r = harness.client.post("/personalizer/v1.0/rank", json=RANK, headers=headers(client["key"]))
    assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
    assert can_rank(harness.client, admin["key"]) == 201
    clock.advance(2 * 86_400)
    assert can_rank(harness.client, admin["key"]) == 401
    assert harness.client.get("/keys", headers=headers(admin["key"])).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        [1],
        "label",
        {"label": 3},
        {"label": "x" * 257},
        {"expiresInDays": 0},
        {"expiresInDays": -1},
        {"expiresInDays": "soon"},
        {"expiresInDays": 1e300},
        {"expiresAt": "tomorrow"},
        {"expiresAt": "2020-01-01T00:00:00Z"},  # in the past
        {"expiresAt": "2099-01-01T00:00:00"},  # no time zone
        {"expiresAt": "2099-01-01T00:00:00Z", "expiresInDays": 1},
        {"expiresIn": 1},  # a typo must not make a key that never expires
    ],
)
@pytest.mark.parametrize("path", ["/keys", "/loops/default/keys"])
def test_bad_key_requests_are_400(harness: Harness, path: str, body: Any) -> None:
    r = harness.client.post(path, json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/keys/18446744073709551616",
        "/keys/-1",
        "/keys/0",
        "/loops/default/keys/18446744073709551616",
        "/loops/default/keys/-9223372036854775809",
        "/loops/default/keys/9223372036854775808",
    ],
)
def test_key_ids_that_cannot_exist_are_400(harness: Harness, path: str) -> None:
    r = harness.client.delete(path, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "BadRequest"


def test_key_management_needs_an_admin_key(harness: Harness) -> None:
    client = harness.client.post("/loops/default/keys", headers=AUTH).json()["key"]
    for method, path in [("GET", "/keys"), ("POST", "/keys"), ("DELETE", "/keys/1")]:
        assert harness.client.request(method, path).status_code == 401
        assert harness.client.request(method, path, headers=headers(client)).status_code == 403


def test_keys_changed_offline_reach_a_running_embedded_server(live_server: LiveServer) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    data = ["--data-dir", str(live_server.settings.data_dir)]
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--admin", "--label", "spare", *data])
    assert created.exit_code == 0, created.output
    key = created.output.strip()
    url = f"{live_server.url}/keys"

    def status() -> int:
        return httpx.get(url, headers=headers(key)).status_code

    wait_for(lambda: status() == 200, "the created key to be accepted")
    key_id = next(k["id"] for k in httpx.get(url, headers=AUTH).json()["value"] if k["label"])
    revoked = runner.invoke(app, ["keys", "revoke", str(key_id), *data])
    assert revoked.exit_code == 0, revoked.output
    wait_for(lambda: status() == 401, "the revoked key to be refused")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Ocp-Apim-Subscription-Key": "wrong"}, 401),
        ({"Authorization": f"Bearer {ADMIN_KEY}"}, 201),
    ],
)
def test_keys(harness: Harness, headers: dict[str, str], status: int) -> None:
    r = harness.client.post("/personalizer/v1.0/rank", json=rank_body(), headers=headers)
    assert r.status_code == status
    if status == 401:
        assert r.json()["error"]["code"] == "Unauthorized"
        assert r.headers["x-ms-error-code"] == "Unauthorized"


def test_client_keys_rank_on_their_loop_only(harness: Harness) -> None:
    r = harness.client.post("/loops/default/keys", headers=AUTH)
    assert r.status_code == 201
    created = r.json()
    client = {"Ocp-Apim-Subscription-Key": created["key"]}
    r = harness.client.post("/personalizer/v1.0/rank", json=rank_body("ck"), headers=client)
    assert r.status_code == 201
    r = harness.client.post(
        "/personalizer/v1.0/events/ck/reward", json={"value": 1}, headers=client
    )
    assert r.status_code == 204
    r = harness.client.get("/personalizer/v1.0/configurations/service", headers=client)
    assert r.status_code == 403 and r.json()["error"]["code"] == "InvalidApiAccess"
    harness.client.put("/loops/other", json={"kind": "cb"}, headers=AUTH)
    r = harness.client.post("/loops/other/personalizer/v1.0/rank", json=rank_body(), headers=client)
    assert r.status_code == 403
    listed = harness.client.get("/loops/default/keys", headers=AUTH).json()["value"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert harness.client.post("/loops/nowhere/keys", headers=AUTH).status_code == 404
    r = harness.client.delete(f"/loops/default/keys/{created['id']}", headers=AUTH)
    assert r.status_code == 204
    r = harness.client.post("/personalizer/v1.0/rank", json=rank_body("ck2"), headers=client)
    assert r.status_code == 401
    assert harness.client.delete("/loops/default/keys/999", headers=AUTH).status_code == 404
