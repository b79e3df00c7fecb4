"""Input only an in-process ranker (service.local.LocalRanker) can be given, Python objects
rather than JSON: it is answered as the server answers the nearest JSON, never with a Python
exception. An integer past 64 bits is the float the API's parser reads for it; NaN and
infinities (JSON has none) are refused with one message wherever they are; an outcome name
that is not a string is a 400."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from service.core import record
from service.core.errors import ApiError
from service.local import LocalRanker
from service.storage.models import Decision
from tests.support.harness import AUTH, Harness

BIG = 2**70  # orjson reads it as a float
LOW = -(2**64)  # and this


def _body(event_id: str, big: Any, low: Any) -> dict[str, Any]:
    return {
        "eventId": event_id,
        "contextFeatures": [{"user": f"u{len(event_id) % 3}", "size": {"big": big}}],
        "actions": [
            {"id": "a0", "features": [{"topic": "t0", "n": low}]},
            {"id": "a1", "features": [{"topic": "t1", "v": [1, big]}]},
            {"id": "a2", "features": [{"topic": "t2"}]},
        ],
    }


def _train(harness: Harness, slots: list[dict[str, Any]] | None = None) -> None:
    """A model trained on 120 decisions of moderate feature values (a1 rewarded; on a
    multi-slot page, `slots` given, a2 in every slot)."""
    base = "/loops/page/personalizer/v1.0" if slots else "/personalizer/v1.0"
    for i in range(120):
        body = _body(f"t{i}", 1.0 + i % 3, -(i % 2))
        if slots is None:
            out = harness.rank(body)
            harness.reward(f"t{i}", 1.0 if out["rewardActionId"] == "a1" else 0.0)
            continue
        page = harness.client.post(
            f"{base}/multislot/rank", json={**body, "slots": slots}, headers=AUTH
        ).json()
        rewards = [
            {"slotId": s["id"], "value": 1.0 if s["rewardActionId"] == "a2" else 0.0}
            for s in page["slots"]
        ]
        harness.client.post(
            f"{base}/multislot/events/t{i}/reward", json={"reward": rewards}, headers=AUTH
        )
    harness.clock.advance(601)
    harness.work()


def _http_rank(harness: Harness, body: dict[str, Any]) -> dict[str, Any]:
    """The server's answer to `body` written as JSON text (the test client's json= would not
    encode the integers, as orjson would not)."""
    r = harness.client.post(
        "/personalizer/v1.0/rank",
        content=json.dumps(body),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def _logged_c(harness: Harness, event_id: str) -> str:
    with harness.dloop.sessions() as s:
        row = s.query(Decision).filter_by(event_id=event_id).one()
    decision = record.decode(row.record)
    assert isinstance(decision, record.Decision)
    return decision.c


def test_integers_past_64_bits_rank_in_process_as_over_http(
    harness: Harness, local: LocalRanker
) -> None:
    """Context, action and array features holding integers orjson reads as floats: the local
    rank answers what the server answers for the same body as JSON and logs the same context;
    with a model trained on those features too (their values move the scores)."""
    for i in range(10):
        body = _body(f"e{i}", BIG, LOW)
        assert local.rank(body) == _http_rank(harness, body), body
    # The decisions each logged (two events: the first decision for an eventId is kept).
    _http_rank(harness, _body("srv", BIG, LOW))
    local.rank(_body("loc", BIG, LOW))
    assert local.flush() >= 1
    harness.work()
    server, mine = _logged_c(harness, "srv"), _logged_c(harness, "loc")
    assert mine == server
    assert '"big":1.1805916207174113e+21' in mine and '"n":-1.8446744073709552e+19' in mine
    _train(harness)
    assert local.refresh()
    # (Only the action's: VW's features are 32-bit floats, and the product of two such
    # values, crossed by -q ::, is past their range.)
    for i in range(20):
        body = _body(f"f{i}", 1, LOW)
        assert local.rank(body) == _http_rank(harness, body), body


NOT_FINITE = "feature values must be finite numbers"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, [1.0, math.nan]])
def test_numbers_that_are_not_finite_are_refused_in_the_context(
    local: LocalRanker, bad: Any
) -> None:
    body = _body("e1", 1, 2)
    body["contextFeatures"][0]["size"]["big"] = bad
    with pytest.raises(ApiError) as caught:
        local.rank(body)
    assert (caught.value.status, caught.value.code) == (400, "InvalidRankRequest")
    assert caught.value.message.startswith(f"contextFeatures[0].size.big: {NOT_FINITE}")


@pytest.mark.parametrize("bad", [math.nan, math.inf, [1.0, math.nan]])
def test_numbers_that_are_not_finite_are_refused_in_an_action(local: LocalRanker, bad: Any) -> None:
    body = _body("e1", 1, bad)
    with pytest.raises(ApiError) as caught:
        local.rank(body)
    assert (caught.value.status, caught.value.code) == (400, "InvalidRankRequest")
    assert caught.value.message.startswith(f"actions[0].features[0].n: {NOT_FINITE}")


@pytest.mark.parametrize("bad", [math.nan, -math.inf, [math.inf]])
def test_numbers_that_are_not_finite_are_refused_in_a_slot(harness: Harness, bad: Any) -> None:
    c = harness.client
    assert c.put("/loops/page", json={"kind": "ccb"}, headers=AUTH).status_code == 201
    key = c.post("/loops/page/keys", headers=AUTH).json()["key"]
    ranker = LocalRanker(key=key, loop="page", http=c, background=False, clock=harness.clock)
    try:
        body = _body("m1", 1, 2)
        body["slots"] = [
            {"id": "top", "baselineAction": "a0", "features": [{"size": "large"}]},
            {"id": "side", "baselineAction": "a1", "features": [{"w": bad}]},
        ]
        with pytest.raises(ApiError) as caught:
            ranker.rank_multi_slot(body)
    finally:
        ranker.close()
    assert (caught.value.status, caught.value.code) == (400, "InvalidRankRequest")
    assert caught.value.message.startswith(f"slots[1].features[0].w: {NOT_FINITE}")


def test_an_outcome_name_that_is_not_a_string_is_a_400(local: LocalRanker) -> None:
    """(JSON object keys are strings: only an in-process caller can send another.)"""
    with pytest.raises(ApiError) as caught:
        local.outcomes("e1", {5: 1.0})
    assert (caught.value.status, caught.value.code) == (400, "InvalidOutcomeRequest")
    assert caught.value.message == "outcomes: outcome names must be strings: 5"


def test_a_model_that_cannot_score_a_request_is_answered_with_finite_probabilities(
    harness: Harness, local: LocalRanker
) -> None:
    """Feature values so large that VW's scores overflow (its features are 32-bit floats,
    crossed by -q ::) on a trained model: the request is valid JSON, and both rankers answer it
    drawing uniformly over the eligible actions, with probabilities that are numbers (they
    answered null, and logged NaN)."""
    _train(harness)
    assert local.refresh()
    body = {**_body("huge", 1e21, -1.8e19), "excludedActions": ["a2"]}
    served = _http_rank(harness, body)
    assert local.rank(body) == served
    assert [(r["id"], r["probability"]) for r in served["ranking"]][-1] == ("a2", 0.0)
    assert sorted(r["probability"] for r in served["ranking"]) == [0.0, 0.5, 0.5]


def test_a_multi_slot_model_that_cannot_score_a_page_fills_it_with_finite_probabilities(
    harness: Harness,
) -> None:
    """The same on a multi-slot loop: each slot drawn uniformly from its actions (they
    answered null), by the server and the in-process ranker alike."""
    c = harness.client
    assert c.put("/loops/page", json={"kind": "ccb"}, headers=AUTH).status_code == 201
    base = "/loops/page/personalizer/v1.0"
    slots = [{"id": "top", "baselineAction": "a0"}, {"id": "side", "baselineAction": "a1"}]
    _train(harness, slots)
    key = c.post("/loops/page/keys", headers=AUTH).json()["key"]
    page = LocalRanker(key=key, loop="page", http=c, background=False, clock=harness.clock)
    try:
        assert page.served.model_id != "N/A"
        body = {**_body("huge", 1e21, -1.8e19), "slots": slots}
        r = c.post(f"{base}/multislot/rank", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        assert page.rank_multi_slot(body) == r.json()
        assert [s["probability"] for s in r.json()["slots"]] == [1 / 3, 1 / 2]
    finally:
        page.close()
