"""service.api.routes.evaluations: bad evaluation and feature-importance contracts are 400s with
Personalizer's codes, unknown jobs 404s."""

from __future__ import annotations

import pytest

from tests.support.harness import AUTH, Harness

W = {"name": "n", "startTime": "2026-01-01", "endTime": "2026-01-02"}


EPS = "--cb_explore_adf"


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("evaluations/e", [], "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "name": ""}, "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "startTime": "soon"}, "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "startTime": 5}, "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "startTime": "2026-01-03"}, "InvalidDateTimesInEvaluationContract"),
        (
            "evaluations/e",
            {**W, "policies": [{"name": "a", "arguments": EPS}] * 2},
            "DuplicateCustomPolicyNames",
        ),
        (
            "evaluations/e",
            {**W, "policies": [{"name": f"p{i}", "arguments": EPS} for i in range(11)]},
            "MaximumEvaluationCustomPoliciesExceeded",
        ),
        (
            "evaluations/e",
            {**W, "policies": [{"name": "a", "arguments": f"{EPS} -d x"}]},
            "InvalidPolicyConfiguration",
        ),
        ("featureImportances/f", {**W, "startTime": "later"}, "InvalidRequest"),
        ("featureImportances/f", {**W, "startTime": "2026-01-03"}, "InvalidRequest"),
    ],
)
def test_bad_job_contracts_are_400(harness: Harness, path: str, body: object, code: str) -> None:
    r = harness.client.put(f"/personalizer/v1.0/{path}", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_unknown_jobs_are_404(harness: Harness) -> None:
    for path, code in (
        ("evaluations/x", "EvaluationNotFound"),
        ("featureImportances/x", "FeatureImportanceNotFound"),
    ):
        r = harness.client.get(f"/personalizer/v1.0/{path}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == code
    base = "/personalizer/v1.0/evaluations/x"
    r = harness.client.get(f"{base}?intervalInMinutes=7", headers=AUTH)
    assert r.status_code == 400
    r = harness.client.get(f"{base}?intervalInMinutes=60&window=Expanding", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "IncompatibleIntervalAndWindow"
