"""Response headers, the API docs, file permissions and printed timestamps."""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.core.settings import load_settings
from service.storage.migrate import upgrade
from tests.support.harness import ADMIN_KEY, AUTH, FakeClock, Harness, make_settings

RANK = {"contextFeatures": [{"a": "b"}], "actions": [{"id": "x", "features": [{"f": "1"}]}]}


def test_every_response_says_nosniff(harness: Harness) -> None:
    c = harness.client
    responses = [
        c.post("/personalizer/v1.0/rank", json=RANK, headers=AUTH),  # the hot path
        c.post("/personalizer/v1.0/rank", content=b"{", headers=AUTH),  # its errors
        c.post("/personalizer/v1.0/events/e/reward", json={"value": 1}, headers=AUTH),
        c.get("/personalizer/v1.0/configurations/service", headers=AUTH),
        c.get("/personalizer/v1.0/configurations/service"),  # 401
        c.get("/nowhere", headers=AUTH),  # 404
        c.post("/personalizer/v1.0/rank", content=b"x" * 300_000, headers=AUTH),  # 413
        c.get("/healthz"),
        c.get("/docs"),
        c.get("/openapi.json"),
    ]
    for r in responses:
        assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, r.status_code)


def test_docs_load_swagger_ui_from_this_server(harness: Harness) -> None:
    page = harness.client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        r = harness.client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert harness.client.get("/openapi.json").json()["info"]["title"] == "dloop"


@pytest.fixture
def no_docs(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path / "data", docs=False)
    with TestClient(create_app(settings, clock=FakeClock(), run_worker=False)) as client:
        yield client


def test_docs_can_be_turned_off(no_docs: TestClient) -> None:
    for path in ("/docs", "/openapi.json", "/docs/swagger-ui/swagger-ui-bundle.js"):
        r = no_docs.get(path, headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound", path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_dir_database_and_logs_are_private(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "new" / "data", api_key=ADMIN_KEY)
    upgrade(settings.database_url)  # dloop up and dloop migrate start here
    with TestClient(create_app(settings, clock=FakeClock(), run_worker=False)) as client:
        assert client.post("/personalizer/v1.0/rank", json=RANK, headers=AUTH).status_code == 201
        data = settings.data_dir
        assert mode(data) == 0o700
        assert mode(data / "log") == 0o700
        files = [data / "dloop.db", *data.glob("dloop.db-*"), *(data / "log").glob("*.log")]
        assert len(files) >= 3  # the database, its WAL files, a log segment
        for path in files:
            assert mode(path) == 0o600, path


@pytest.mark.parametrize("path", ["/evaluations/y1", "/featureImportances/y1"])
def test_year_one_prints_with_four_digits(harness: Harness, path: str) -> None:
    body = {"name": "n", "startTime": "0001-01-01T00:00:00Z", "endTime": "2020-01-01T00:00:00Z"}
    r = harness.client.put(f"/personalizer/v1.1-preview.3{path}", json=body, headers=AUTH)
    assert r.status_code in (200, 201), r.text
    assert r.json()["startTime"] == "0001-01-01T00:00:00.000000Z"
    r = harness.client.get(f"/personalizer/v1.1-preview.3{path}", headers=AUTH)
    assert r.json()["startTime"] == "0001-01-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    "start,end",
    [
        ("0001-01-01T00:00:00+01:00", "2020-01-01T00:00:00Z"),  # before year 1 in UTC
        ("2020-01-01T00:00:00Z", "9999-12-31T23:59:59-01:00"),  # after year 9999 in UTC
    ],
)
def test_instants_that_cannot_be_printed_are_400(harness: Harness, start: str, end: str) -> None:
    body = {"name": "n", "startTime": start, "endTime": end}
    r = harness.client.put("/personalizer/v1.1-preview.3/evaluations/e", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidEvaluationContract"
