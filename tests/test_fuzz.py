"""Regressions found by fuzzing the HTTP API."""

from __future__ import annotations

import pytest

from tests.conftest import AUTH, Harness


def test_loop_kind_that_is_not_a_string_is_400(harness: Harness) -> None:
    for kind in ({}, [], 1):
        r = harness.client.put("/loops/x", json={"kind": kind}, headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "InvalidRequest"


@pytest.mark.parametrize("when", ["0181-07-26T18:31:10Z", "0001-01-01T00:00:00Z"])
def test_early_job_times_are_answered_as_rfc3339(harness: Harness, when: str) -> None:
    body = {"name": "n", "startTime": when, "endTime": "2026-01-01T00:00:00Z"}
    r = harness.client.put("/personalizer/featureImportances/j", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["startTime"] == when.replace("Z", ".000000Z")


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_job_times_out_of_range_are_400(harness: Harness, when: str) -> None:
    body = {"name": "n", "startTime": when, "endTime": when}
    r = harness.client.put("/personalizer/evaluations/e", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "InvalidEvaluationContract"


def test_key_id_beyond_64_bits_is_400(harness: Harness) -> None:
    r = harness.client.delete("/loops/default/keys/9223372036854775808", headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "BadRequest"


def test_evaluation_query_is_checked_after_the_key(harness: Harness) -> None:
    r = harness.client.get("/personalizer/evaluations/e?window=Rolling")
    assert r.status_code == 401, r.text


def test_interval_of_non_ascii_digits_is_400(harness: Harness) -> None:
    body = {"name": "n", "startTime": "2026-01-01T00:00:00Z", "endTime": "2026-01-02T00:00:00Z"}
    assert harness.client.put("/personalizer/evaluations/e", json=body, headers=AUTH).is_success
    r = harness.client.get("/personalizer/evaluations/e?intervalInMinutes=²", headers=AUTH)
    assert r.status_code == 400, r.text
