"""Who may see and change what (issue 14): viewer keys only look; the dashboard's session
cookie stands for the key it was opened with (HttpOnly, SameSite=Strict), and every change made
with it needs the session's CSRF token; logout; a revoked key ends its sessions."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness

CONFIG = "/personalizer/v1.0/configurations/service"


def _key(h: Harness, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = h.client.post(path, json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def _as(key: str) -> dict[str, str]:
    return {"Ocp-Apim-Subscription-Key": key}


def test_a_loop_viewer_key_only_looks_at_its_loop(harness: Harness) -> None:
    made = _key(harness, "/loops/default/keys", {"role": "viewer", "label": "analyst"})
    assert (made["role"], made["loop"]) == ("viewer", "default")
    viewer = _as(made["key"])
    c = harness.client
    harness.rank(rank_body("e1"))
    harness.work()
    for path in (
        CONFIG,
        "/personalizer/v1.0/configurations/policy",
        "/personalizer/v1.0/evaluations",
        "/personalizer/v1.0/events/e1",
        "/loops/default/stats",
        "/loops/default/holdout",
        "/loops/default/personalizer/v1.0/model/properties",
    ):
        assert c.get(path, headers=viewer).status_code == 200, path
    cfg = c.get(CONFIG, headers=viewer).json()
    assert c.put(CONFIG, json=cfg, headers=viewer).status_code == 403
    assert (
        c.post("/personalizer/v1.0/rank", json=rank_body("e2"), headers=viewer).status_code == 403
    )
    assert c.get("/keys", headers=viewer).status_code == 403
    assert c.get("/loops/default/keys", headers=viewer).status_code == 403
    assert c.get("/overview", headers=viewer).status_code == 403  # every loop: not its scope
    assert c.get("/personalizer/v1.0/model", headers=viewer).status_code == 403
    assert c.put("/loops/other", json={"kind": "cb"}, headers=AUTH).status_code == 201
    assert c.get("/loops/other/stats", headers=viewer).status_code == 403
    # Listed with the loop's keys, revocable like them.
    listed = c.get("/loops/default/keys", headers=AUTH).json()["value"]
    assert [k["role"] for k in listed] == ["viewer"]


def test_a_viewer_key_of_every_loop_sees_the_overview(harness: Harness) -> None:
    made = _key(harness, "/keys", {"role": "viewer"})
    assert made["role"] == "viewer"
    viewer = _as(made["key"])
    doc = harness.client.get("/overview", headers=viewer).json()
    assert doc["count"] == 1 and doc["value"][0]["name"] == "default"
    assert harness.client.get("/metrics", headers=viewer).status_code == 200
    assert harness.client.post("/keys", json={}, headers=viewer).status_code == 403
    # It shows in the deployment's key list and is revoked there.
    listed = harness.client.get("/keys", headers=AUTH).json()["value"]
    assert sorted(k["role"] for k in listed) == ["admin", "viewer"]
    assert harness.client.delete(f"/keys/{made['id']}", headers=AUTH).status_code == 204
    assert harness.client.get("/overview", headers=viewer).status_code == 401


def test_bad_key_roles_are_a_400(harness: Harness) -> None:
    for body in ({"role": "admin"}, {"role": "owner"}, {"role": 1}):
        r = harness.client.post("/loops/default/keys", json=body, headers=AUTH)
        assert r.status_code == 400, r.text


def _login(client: TestClient, key: str) -> dict[str, Any]:
    r = client.post("/ui/login", json={"key": key})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    out: dict[str, Any] = r.json()
    return out


def test_session_cookie_stands_for_the_key_and_changes_need_the_csrf_token(
    harness: Harness,
) -> None:
    c = harness.client
    assert c.get("/ui/session").json() == {"role": None, "loop": None, "csrfToken": None}
    assert c.get(CONFIG).status_code == 401
    session = _login(c, AUTH["Ocp-Apim-Subscription-Key"])
    assert session["role"] == "admin" and session["loop"] is None
    assert c.get("/ui/session").json() == session
    cfg = c.get(CONFIG).json()  # the cookie alone is enough to look
    assert c.put(CONFIG, json=cfg).status_code == 403  # a change needs the token
    r = c.put(CONFIG, json=cfg, headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "InvalidApiAccess"
    r = c.put(
        CONFIG, json={**cfg, "holdoutPercentage": 5}, headers={"X-CSRF-Token": session["csrfToken"]}
    )
    assert r.status_code == 200, r.text
    # Logout needs the token too, then the cookie is gone.
    assert c.post("/ui/logout").status_code == 403
    assert c.post("/ui/logout", headers={"X-CSRF-Token": session["csrfToken"]}).status_code == 204
    assert c.get(CONFIG).status_code == 401
    assert c.get("/ui/session").json()["role"] is None


def test_login_is_for_admin_and_viewer_keys_only(harness: Harness) -> None:
    c = harness.client
    client_key = _key(harness, "/loops/default/keys", {})["key"]
    r = c.post("/ui/login", json={"key": client_key})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = c.post("/ui/login", json={"key": "not-a-key"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
    for bad in (None, {}, {"key": 7}, [1]):
        assert c.post("/ui/login", json=bad).status_code == 400
    viewer = _key(harness, "/loops/default/keys", {"role": "viewer"})
    session = _login(c, viewer["key"])
    assert (session["role"], session["loop"]) == ("viewer", "default")
    token = {"X-CSRF-Token": session["csrfToken"]}
    cfg = c.get(CONFIG).json()
    assert c.put(CONFIG, json=cfg, headers=token).status_code == 403  # a viewer, token or not
    # Revoking the key ends its sessions at once.
    assert c.delete(f"/loops/default/keys/{viewer['id']}", headers=AUTH).status_code == 204
    assert c.get(CONFIG).status_code == 401


def test_a_tampered_cookie_is_no_session(harness: Harness) -> None:
    c = harness.client
    _login(c, AUTH["Ocp-Apim-Subscription-Key"])
    value = c.cookies.get("dloop_session")
    assert value
    signed, signature = value.rsplit(".", 1)
    c.cookies.clear()
    c.cookies.set("dloop_session", f"{signed}.{signature[::-1]}")
    assert c.get(CONFIG).status_code == 401
    assert c.get("/ui/session").json()["role"] is None


def test_the_page_and_its_files_are_served_without_a_key(harness: Harness) -> None:
    c = harness.client
    page = c.get("/ui/")
    assert page.status_code == 200 and "dloop dashboard" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert c.get("/ui", follow_redirects=False).status_code == 307
    js = c.get("/ui/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000  # plotly.js, from the package
    assert c.get("/ui/static/app.js").status_code == 200
    assert c.get("/ui/static/style.css").headers["content-type"].startswith("text/css")
    assert c.get("/ui/static/..%2F..%2Fapp.py").status_code == 404
    assert c.get("/ui/static/secrets.txt").status_code == 404
