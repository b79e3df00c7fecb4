"""A loop's service configuration (service.core.schemas): the default is valid, and values
outside Personalizer's bounds are refused."""

from __future__ import annotations

from typing import Any

import pytest

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
