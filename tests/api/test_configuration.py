"""service.api.routes.configuration: the service configuration and the policy, their
validation (a policy naming a file is refused, here and for custom evaluation policies, and no
file is touched), learning modes (Apprentice, LoggingOnly), and the resets a change of policy or
exploration makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.bodies import rank_body
from tests.support.files import assert_untouched
from tests.support.harness import AUTH, Harness


def test_learning_mode_change_must_be_alone(harness: Harness) -> None:
    cfg = harness.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
    cfg.update(learningMode="Apprentice", defaultReward=0.5)
    r = harness.client.put("/personalizer/v1.0/configurations/service", json=cfg, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "InvalidLearningModeServiceConfiguration"


@pytest.mark.parametrize(
    "changes",
    [{"rewardWaitTime": "PT0S"}, {"rewardAggregation": "mode"}, {"modelExportFrequency": "PT0.1S"}],
)
def test_bad_configuration_is_400(harness: Harness, changes: dict[str, Any]) -> None:
    cfg = harness.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
    cfg.update(changes)
    r = harness.client.put("/personalizer/v1.0/configurations/service", json=cfg, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidServiceConfiguration"
    r = harness.client.put("/personalizer/v1.0/configurations/service", json=[1], headers=AUTH)
    assert r.status_code == 400


def test_apprentice_serves_baseline_and_reports_metrics(harness: Harness) -> None:
    harness.configure(learningMode="Apprentice")
    for i in range(20):
        out = harness.rank(rank_body(f"ap{i}", excludedActions=["news"]))
        assert out["rewardActionId"] == "sports"  # first non-excluded action
        harness.reward(f"ap{i}", 1.0)
    harness.work()
    cfg = harness.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
    metrics = cfg["latestApprenticeModeMetrics"]
    assert metrics["numberOfEvents"] == 20
    assert metrics["sumOfRewards"] == 20.0
    assert 0 < metrics["numberOfImitatedEvents"] <= 20
    assert metrics["lastBatchMetrics"]["numberOfEvents"] == 20


def test_logging_only_keeps_input_order_and_does_not_learn(harness: Harness) -> None:
    harness.configure(learningMode="LoggingOnly")
    for i in range(10):
        out = harness.rank(rank_body(f"lo{i}"))
        assert [a["id"] for a in out["ranking"]] == ["news", "sports", "tech"]
        harness.reward(f"lo{i}", 1.0)
    harness.clock.advance(20)
    harness.work()
    assert harness.dloop.registry.loops["default"].model_id == "N/A"


def test_policy_update_validates_and_resets(harness: Harness) -> None:
    url = "/personalizer/v1.0/configurations/policy"
    assert harness.client.get(url, headers=AUTH).json()["name"] == "dloop-default"
    r = harness.client.put(
        url, json={"name": "p", "arguments": "--cb_explore_adf -f /tmp/x"}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidPolicyConfiguration"
    r = harness.client.put(url, json={"name": "p"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidPolicyContract"
    personalizer = "--cb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::"
    r = harness.client.put(url, json={"name": "pz", "arguments": personalizer}, headers=AUTH)
    assert r.status_code == 200 and r.json()["arguments"] == personalizer
    r = harness.client.delete(url, headers=AUTH)
    assert r.status_code == 200 and r.json()["name"] == "dloop-default"


def test_exploration_change_resets_and_retrains_on_history(harness: Harness) -> None:
    harness.configure(modelExportFrequency="PT1S", rewardWaitTime="PT5S")
    for i in range(30):
        harness.rank(rank_body(f"h{i}"))
        harness.reward(f"h{i}", 1.0)
    harness.clock.advance(2)
    harness.work()
    before = harness.dloop.registry.loops["default"].model_id
    harness.configure(explorationPercentage=0.05)
    after = harness.dloop.registry.loops["default"].model_id
    assert after not in (before, "N/A")  # a new model, retrained on the last 2 days
    from service.storage.models import ModelCheckpoint

    with harness.dloop.sessions() as s:
        ckpt = s.get(ModelCheckpoint, "default")
        assert ckpt is not None and ckpt.examples == 30
        assert "--gamma_scale 40" in ckpt.arguments


POLICY = "/personalizer/v1.0/configurations/policy"


@pytest.mark.parametrize(
    "template",
    [
        "--cb_explore_adf -f{path}",
        "--cb_explore_adf -p{path}",
        "--cb_explore_adf --final_regressor={path}",
        "--cb_explore_adf {path}",
        "--cb_explore_adf --data {path}",
        "--cb_explore_adf -d{path}",
        "--cb_explore_adf --ignore 'a -f {path}'",
    ],
)
def test_api_refuses_file_options_and_touches_no_file(
    harness: Harness, files: tuple[Path, Path], template: str
) -> None:
    existing, fresh = files
    before = harness.client.get(POLICY, headers=AUTH).json()
    answers = []
    for path in (existing, fresh):
        args = template.format(path=path)
        r = harness.client.put(POLICY, json={"name": "p", "arguments": args}, headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "InvalidPolicyConfiguration"
        answers.append(r.json()["error"]["message"].replace(str(path), "PATH"))
        r = harness.client.put(
            "/personalizer/v1.0/evaluations/e",
            json={
                "name": "e",
                "startTime": "2026-01-01",
                "endTime": "2026-01-02",
                "policies": [{"name": "custom", "arguments": args}],
            },
            headers=AUTH,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "InvalidPolicyConfiguration"
    assert answers[0] == answers[1]
    assert_untouched(existing, fresh)
    assert harness.client.get(POLICY, headers=AUTH).json() == before


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ("--cb_explore_adf -b 40 -q ::", "-b 40"),
        ("--cb_explore_adf --no_such_option -q ::", "--no_such_option"),
    ],
)
def test_api_names_the_refused_option(harness: Harness, args: str, named: str) -> None:
    r = harness.client.put(POLICY, json={"name": "p", "arguments": args}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidPolicyConfiguration"
    assert named in r.json()["error"]["message"]


def test_api_accepts_attached_spellings(harness: Harness) -> None:
    args = "--cb_explore_adf --epsilon=0.1 -b20 -l0.01 -q::"
    r = harness.client.put(POLICY, json={"name": "p", "arguments": args}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert harness.client.get(POLICY, headers=AUTH).json()["arguments"] == args
