"""service.api.routes.events through raw requests: rank on every path style, reward, activate,
bad input, retries and reused eventIds, explanations and the event view; a rank that would crash
VW is a 400, and a NUL in an id is refused before it can reach Postgres."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.storage import store
from service.storage.migrate import upgrade
from tests.support.bodies import ACTIONS, rank_body
from tests.support.harness import AUTH, FakeClock, Harness, joined, make_settings


@pytest.mark.parametrize(
    "path",
    [
        "/personalizer/v1.0/rank",
        "/personalizer/v1.1-preview.1/rank",
        "/personalizer/v1.1-preview.3/rank",
        "/personalizer/rank?api-version=2022-09-01-preview",
    ],
)
def test_every_path_style_ranks(harness: Harness, path: str) -> None:
    out = harness.rank(rank_body(), path)
    assert out["eventId"] == "e1"
    assert out["rewardActionId"] == out["ranking"][0]["id"]
    assert sorted(a["id"] for a in out["ranking"]) == ["news", "sports", "tech"]


def test_uniform_before_the_first_model(harness: Harness) -> None:
    out = harness.rank(rank_body())
    assert [a["probability"] for a in out["ranking"]] == pytest.approx([1 / 3] * 3)


def test_generated_event_id(harness: Harness) -> None:
    body = rank_body()
    del body["eventId"]
    out = harness.rank(body)
    assert len(out["eventId"]) == 32


def test_excluded_actions_are_listed_with_zero_and_never_chosen(harness: Harness) -> None:
    for i in range(60):
        out = harness.rank(rank_body(f"x{i}", excludedActions=["news", "tech"]))
        assert out["rewardActionId"] == "sports"
        probs = {a["id"]: a["probability"] for a in out["ranking"]}
        assert probs == {"sports": 1.0, "news": 0.0, "tech": 0.0}


BAD_RANKS: list[tuple[Any, str]] = [
    ({"actions": []}, "InvalidRankRequest"),
    (
        {"actions": [{"id": f"a{i}", "features": [{"f": 1}]} for i in range(51)]},
        "InvalidRankRequest",
    ),
    ({"actions": [{"id": "", "features": [{"f": 1}]}]}, "InvalidRankRequest"),
    ({"actions": [{"id": "x" * 257, "features": [{"f": 1}]}]}, "InvalidRankRequest"),
    ({"actions": [{"id": "a"}]}, "InvalidRankRequest"),
    ({"actions": [{"id": "a", "features": [{"f": None}]}]}, "InvalidRankRequest"),
    ({"actions": [{"id": "a", "features": [{"tags": ["x", "y"]}]}]}, "InvalidRankRequest"),
    ({"actions": [None]}, "InvalidRankRequest"),
    (
        {"actions": [{"id": "a", "features": [{"f": 1}]}], "contextFeatures": [None]},
        "InvalidRankRequest",
    ),
    (
        {"actions": [{"id": "a", "features": [{"f": 1}]}], "contextFeatures": {"a": 1}},
        "InvalidRankRequest",
    ),
    (
        {"actions": [{"id": "a", "features": [{"f": 1}]}, {"id": "a", "features": [{"f": 2}]}]},
        "InvalidRankRequest",
    ),
    (
        {"actions": [{"id": "a", "features": [{"f": 1}]}], "excludedActions": ["a"]},
        "InvalidRankRequest",
    ),
    (
        {"actions": [{"id": "a", "features": [{"f": 1}]}], "excludedActions": "a"},
        "InvalidRankRequest",
    ),
    ({"actions": [{"id": "a", "features": [{"f": 1}]}], "eventId": ""}, "InvalidRankRequest"),
    ({"actions": [{"id": "a", "features": [{"f": 1}]}], "eventId": 12}, "InvalidRankRequest"),
    (
        {"actions": [{"id": "a", "features": [{"f": 1}]}], "deferActivation": "yes"},
        "InvalidRankRequest",
    ),
    ([1, 2], "InvalidRankRequest"),
]


@pytest.mark.parametrize(("body", "code"), BAD_RANKS)
def test_bad_rank_requests(harness: Harness, body: Any, code: str) -> None:
    r = harness.client.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]


def test_malformed_json_is_400(harness: Harness) -> None:
    r = harness.client.post("/personalizer/v1.0/rank", content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRankRequest"
    r = harness.client.post("/personalizer/v1.0/events/e/reward", content=b"", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRewardRequest"


@pytest.mark.parametrize("value", [1.5, -1.01, "1", None, True, [1]])
def test_bad_reward_values(harness: Harness, value: Any) -> None:
    r = harness.client.post(
        "/personalizer/v1.0/events/e1/reward", json={"value": value}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRewardRequest"


def test_non_finite_reward_is_400(harness: Harness) -> None:
    r = harness.client.post(
        "/personalizer/v1.0/events/e1/reward", content=b'{"value": NaN}', headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRewardRequest"


def test_long_event_id_on_activate_is_400(harness: Harness) -> None:
    r = harness.client.post(f"/personalizer/v1.0/events/{'x' * 257}/activate", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidEventIdToActivate"


def test_oversized_body_is_413(harness: Harness) -> None:
    body = rank_body(contextFeatures=[{"blob": "x" * 300_000}])
    r = harness.client.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "PayloadSizeExceeded"


def test_retry_returns_original_response_and_logs_once(harness: Harness) -> None:
    first = harness.client.post("/personalizer/v1.0/rank", json=rank_body("dup"), headers=AUTH)
    again = harness.client.post("/personalizer/v1.0/rank", json=rank_body("dup"), headers=AUTH)
    assert again.status_code == 201 and again.content == first.content
    other = rank_body("dup", actions=ACTIONS[:2])
    r = harness.client.post("/personalizer/v1.0/rank", json=other, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRankRequest"
    harness.clock.advance(700)
    harness.work()
    from service.storage.models import Joined

    with harness.dloop.sessions() as s:
        assert s.query(Joined).filter_by(event_id="dup").count() == 1


def test_same_event_id_same_model_same_choice_after_restart_of_cache(harness: Harness) -> None:
    # Uniform over 3 actions: an unseeded draw would match one time in three per event, so
    # all of 60 matching by chance is a (1/3)^60 event.
    ids = [f"seeded-{i}" for i in range(60)]
    first = [harness.rank(rank_body(e)) for e in ids]
    harness.dloop.retries.clear()
    again = [harness.rank(rank_body(e)) for e in ids]
    assert [r["ranking"] for r in again] == [r["ranking"] for r in first]
    assert [r["rewardActionId"] for r in again] == [r["rewardActionId"] for r in first]
    # The draw follows the eventId: every action is drawn for some of them.
    assert {r["rewardActionId"] for r in first} == {"news", "sports", "tech"}
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert 'dloop_rank_retries_total{loop="default"}' not in metrics  # none from the cache


@pytest.mark.parametrize("kind", ["cb", "rl", "ccb"])
def test_a_reused_event_id_is_ranked_for_its_request_and_not_logged(
    harness: Harness, kind: str
) -> None:
    """Only the same request again (its JSON normalised) is a retry; another request with a
    used eventId is answered, counted, and not logged: the first decision is the one that
    joins."""
    assert harness.client.put("/loops/l", json={"kind": kind}, headers=AUTH).status_code == 201
    path = "/loops/l/personalizer/v1.1-preview.1/" + ("multislot/rank" if kind == "ccb" else "rank")
    body = rank_body("dup")
    if kind == "ccb":
        body["slots"] = [{"id": "hero", "baselineAction": "news"}]
    start = harness.dloop.log.end()
    first = harness.client.post(path, json=body, headers=AUTH)
    assert first.status_code == 201
    # The same request with its keys in another order and other whitespace: a retry.
    same = orjson.dumps(dict(reversed(body.items())), option=orjson.OPT_INDENT_2)
    headers = {**AUTH, "Content-Type": "application/json"}
    again = harness.client.post(path, content=same, headers=headers)
    assert again.status_code == 201 and again.content == first.content
    other = {**body, "contextFeatures": [{"time": "evening"}], "deferActivation": True}
    assert harness.client.post(path, json=other, headers=AUTH).status_code == 201
    records = [orjson.loads(r) for r in harness.dloop.log.read(start)[0]]
    logged = [(r["k"], r["id"], r.get("deferred")) for r in records]
    decision = ("m" if kind == "ccb" else "d", "dup", False)
    assert logged == ([decision, ("e", "dup", None)] if kind == "rl" else [decision])
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert 'dloop_rank_retries_total{loop="l"} 1.0' in metrics
    assert 'dloop_event_id_reused_total{loop="l"} 1.0' in metrics
    assert 'dloop_rank_total{loop="l"} 2.0' in metrics


def test_a_reused_event_id_the_cache_forgot_is_logged_and_the_first_decision_joins(
    harness: Harness,
) -> None:
    """The cache is bounded: once it has evicted an eventId, a reuse of it cannot be told from
    a new eventId. It is logged, and the joiner keeps the first decision of the eventId."""
    from service.storage.models import Decision

    harness.rank(rank_body("gone"))
    harness.dloop.retries.clear()  # as if evicted
    harness.rank(rank_body("gone", contextFeatures=[{"time": "evening"}]))
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert "dloop_event_id_reused_total{" not in metrics
    harness.reward("gone", 1.0)
    harness.work()
    with harness.dloop.sessions() as s:
        decision = s.get(Decision, ("default", "gone"))
        assert decision is not None and "morning" in decision.record
    line = joined(harness, "gone")
    assert line is not None and line["c"]["FromUrl"] == [{"time": "morning"}]


def test_explanations_and_the_event_view(harness: Harness) -> None:
    harness.configure(
        isInferenceExplainabilityEnabled=True, rewardWaitTime="PT5S", modelExportFrequency="PT1S"
    )
    body = {
        "contextFeatures": [{"user": {"tier": "gold"}, "time": "morning"}],
        "actions": ACTIONS,
    }
    first = harness.rank({**body, "eventId": "x0"})
    # Before any model: uniform, nothing to explain yet.
    assert all(e["features"] == [] for e in first["inferenceExplanation"])
    for i in range(1, 300):  # gold users like the first action, and only them
        tier = "gold" if i % 2 else "basic"
        ctx = [{"user": {"tier": tier}, "time": "morning"}]
        r = harness.rank({"contextFeatures": ctx, "actions": ACTIONS, "eventId": f"x{i}"})
        chosen = r["rewardActionId"]
        harness.reward(f"x{i}", 1.0 if (chosen == ACTIONS[0]["id"]) == (tier == "gold") else 0.0)
        if i % 50 == 0:
            harness.clock.advance(2)
            harness.work()
    harness.clock.advance(2)
    harness.work()
    r = harness.rank({**body, "eventId": "explained"})
    explanation = {e["id"]: e["features"] for e in r["inferenceExplanation"]}
    assert set(explanation) == {a["id"] for a in ACTIONS}
    top = explanation[ACTIONS[0]["id"]][0]
    assert top["name"] == "user.tier" and top["score"] > 0  # gold raises the first action
    harness.reward("explained", 0.5)
    harness.clock.advance(1)
    harness.work()

    view = harness.client.get("/personalizer/v1.0/events/explained", headers=AUTH).json()
    assert view["eventId"] == "explained" and view["joined"] and view["reward"] == 0.5
    assert view["inferenceExplanation"] == r["inferenceExplanation"]
    assert [a["id"] for a in view["ranking"]] == [a["id"] for a in r["ranking"]]
    assert view["observations"][0]["kind"] == "reward"
    missing = harness.client.get("/personalizer/v1.0/events/nope", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "EventNotFound"
    unauthorized = harness.client.get("/personalizer/v1.0/events/explained")
    assert unauthorized.status_code == 401


def test_a_rank_that_would_crash_vw_is_a_400_and_the_server_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if a new parser bug slipped past the feature cleaner: the ranking processes rank with
    the cleaner switched off (the rank runs in them, service.core.ranks)."""
    from service import app
    from tests.support.crashing import rank_without_cleaner

    monkeypatch.setattr(app, "RANKING_OPS", {"rank": rank_without_cleaner})
    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings, clock=FakeClock(), run_worker=False)) as c:
        model = c.get("/personalizer/v1.0/model", headers=AUTH).content
        assert c.put("/personalizer/v1.0/model", content=model, headers=AUTH).status_code == 204
        body = {
            "contextFeatures": [{"__aid": 0}],
            "actions": [{"id": "a", "features": [{"x": 1}]}],
        }
        r = c.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
        assert r.status_code == 400, r.text
        assert "Vowpal Wabbit crashed" in r.json()["error"]["message"]
        # Remembered: the same request is refused without another crash.
        again = c.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
        assert again.status_code == 400 and "crashed" in again.json()["error"]["message"]
        body["contextFeatures"] = [{"fine": 1}]
        assert c.post("/personalizer/v1.0/rank", json=body, headers=AUTH).status_code == 201
        metrics = c.get("/metrics", headers=AUTH).text
        assert "dloop_ranker_crashes 1" in metrics
        assert "dloop_ranker_refused 1" in metrics


def test_a_nul_in_an_id_is_refused_and_cannot_stop_ingestion(
    postgres_url: str, tmp_path: Path
) -> None:
    """Postgres refuses NUL in text: a reward for eventId "a\\0b" used to be accepted, then made
    every worker pass fail, so no loop ingested anything any more."""
    upgrade(postgres_url)
    settings = make_settings(tmp_path / "data", db={"url": postgres_url})
    with TestClient(create_app(settings, clock=FakeClock(), run_worker=False)) as client:
        h = Harness(client, FakeClock())
        r = client.post("/personalizer/v1.0/events/a%00b/reward", json={"value": 1}, headers=AUTH)
        assert r.status_code == 400, r.text
        body = {"eventId": "a\x00b", "actions": [{"id": "x", "features": [{"f": 1}]}]}
        assert client.post("/personalizer/v1.0/rank", json=body, headers=AUTH).status_code == 400
        assert client.get("/personalizer/v1.0/events/a%00b", headers=AUTH).status_code == 404
        # and what reaches the log anyway (another version, another producer) is dead-lettered
        h.dloop.log.append(orjson.dumps({"k": "r", "loop": "default", "id": "a\x00b", "t": 1.0}))
        h.rank({"eventId": "fine", "actions": [{"id": "x", "features": [{"f": 1}]}]})
        h.work()
        with h.dloop.sessions() as session:
            assert store.event(session, loop="default", event_id="fine") is not None
            assert store.dead_letter_count(session) == 1
