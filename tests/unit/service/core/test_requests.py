"""The rank request's checks (service.core.requests), which the API and LocalRanker share."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from learners.features import FeatureLimits
from service.core import requests
from service.core.errors import ApiError
from service.core.requests import parse_rank

LIMITS = FeatureLimits()


def body(actions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"contextFeatures": [{"user": {"tier": "gold"}}], "actions": actions}


def catalogue() -> list[dict[str, Any]]:
    return [
        {"id": f"a{i}", "features": [{"kind": f"k{i % 3}", "_hidden": 1}, {"price": i}]}
        for i in range(10)
    ]


def test_an_action_list_seen_before_gives_what_checking_it_again_gives() -> None:
    """An app ranks its catalogue over and over: the checks of a recent list are remembered
    by its JSON, and give what checking it afresh gives, whatever a caller did with the
    lists it got the time before."""
    requests._checked_actions.cache_clear()
    first = parse_rank(body(catalogue()), 50, LIMITS)
    first["ids"].append("changed")  # a caller's own lists: what it does to them stays its own
    first["features"].pop()
    second = parse_rank(body(catalogue()), 50, LIMITS)
    assert requests._checked_actions.cache_info().hits == 1
    fresh = requests._check_actions(catalogue(), LIMITS)
    assert (second["ids"], second["features"], second["features_count"] - 1) == fresh
    assert second["ids"] == [f"a{i}" for i in range(10)]
    assert second["features"][0] == [{"kind": "k0"}, {"price": 0}]  # `_` keys dropped


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        ([{"id": "a", "features": []}], "actions[0].features needs at least one non-null"),
        ([{"id": "a", "features": [{"x": 1}]}, {"id": "a", "features": [{"x": 2}]}], "unique"),
        ([{"id": "", "features": [{"x": 1}]}], "actions[0].id must be a non-empty string"),
    ],
)
def test_an_action_list_that_fails_the_checks_fails_them_every_time(
    actions: list[dict[str, Any]], message: str
) -> None:
    for _ in range(2):
        with pytest.raises(ApiError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_rank(body(actions), 50, LIMITS)


def test_a_large_or_unwritable_action_list_is_checked_without_being_remembered() -> None:
    requests._checked_actions.cache_clear()
    big = [{"id": f"a{i}", "features": [{"text": "x" * 2000}]} for i in range(10)]
    assert parse_rank(body(big), 50, LIMITS)["ids"][9] == "a9"
    odd = [{"id": "a", "features": [{1: "a key JSON cannot hold"}]}]  # in-process callers
    with pytest.raises(ApiError, match="feature names must be strings"):  # was a TypeError
        parse_rank(body(odd), 50, LIMITS)
    assert requests._checked_actions.cache_info().currsize == 0


def test_an_event_id_made_for_a_rank_is_a_version_4_uuid() -> None:
    """What uuid.uuid4().hex gives (Personalizer's format), made faster: 32 hex digits of a
    random version 4, RFC 4122 UUID, never the same twice."""
    made = {requests.new_event_id() for _ in range(2000)}
    assert len(made) == 2000
    for event_id in made:
        parsed = uuid.UUID(event_id)
        assert parsed.hex == event_id
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
