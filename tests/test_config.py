"""Configuration and policy validation."""

from __future__ import annotations

from typing import Any

import pytest

from learners.policy import PolicyError, with_exploration
from learners.vw import check_policy
from service.core.schemas import default_config, parse_config


def config(**changes: Any) -> dict[str, Any]:
    doc = default_config(0.0)
    doc.update(changes)
    return doc


def test_default_configuration_is_valid() -> None:
    cfg = parse_config(config())
    assert cfg.reward_wait_time.total_seconds() == 600
    assert cfg.model_export_frequency.total_seconds() == 10


@pytest.mark.parametrize(
    "changes",
    [
        {"rewardWaitTime": "PT0.5S"},
        {"rewardWaitTime": "P31D"},
        {"modelExportFrequency": "PT0.5S"},
        {"rewardAggregation": "mode"},
        {"defaultReward": 2},
        {"explorationPercentage": 1.5},
        {"learningMode": "Sometimes"},
        {"logRetentionDays": 0},
        {"modelRetrainDays": -1},
        {"rewardWaitTime": "not a duration"},
    ],
)
def test_invalid_configurations(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        parse_config(config(**changes))


def test_bounds_are_inclusive() -> None:
    parse_config(config(rewardWaitTime="PT1S", modelExportFrequency="PT1S"))
    parse_config(config(rewardWaitTime="P30D", logRetentionDays=-1))
    assert parse_config(config(rewardAggregation="Median")).reward_aggregation == "median"


def test_exploration_rewrites_epsilon() -> None:
    args = "--cb_explore_adf --epsilon 0.2 --power_t 0 -q ::"
    assert with_exploration(args, 0.05) == "--cb_explore_adf --power_t 0 -q :: --epsilon 0.05"


def test_exploration_sets_squarecb_gamma_scale() -> None:
    assert with_exploration("--cb_explore_adf --squarecb", 0.2).endswith("--gamma_scale 10")
    assert with_exploration("--cb_explore_adf --squarecb --gamma_scale=3", 0.5).endswith(
        "--squarecb --gamma_scale 4"
    )
    assert with_exploration("--cb_explore_adf --squarecb", 0.0).endswith("--gamma_scale 1e+06")


@pytest.mark.parametrize(
    "args",
    [
        "--cb_adf -q ::",
        "--cb_explore_adf -f /tmp/evil.model",
        "--cb_explore_adf --final_regressor=/tmp/x",
        "--cb_explore_adf --readable_model /tmp/x",
        "--cb_explore_adf --no_such_option",
        "--cb_explore_adf --epsilon 'unterminated",
        "--cb_explore_adf " + "-q :: " * 300,
    ],
)
def test_rejected_policies(args: str) -> None:
    with pytest.raises(PolicyError):
        check_policy(args)


def test_accepted_policies() -> None:
    check_policy("--cb_explore_adf --squarecb -q ::")
    check_policy("--cb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::")
    check_policy("--cb_explore_adf --bag 3 -q ::")


def test_the_default_policy_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from service.core.settings import load_settings

    monkeypatch.delenv("DLOOP_DEFAULT_POLICY", raising=False)
    assert load_settings().default_policy == "dloop-default"
    monkeypatch.setenv("DLOOP_DEFAULT_POLICY", "personalizer-default")
    assert load_settings().default_policy == "personalizer-default"
    monkeypatch.setenv("DLOOP_DEFAULT_POLICY", "vw-default")
    with pytest.raises(ValidationError, match="default_policy"):
        load_settings()
