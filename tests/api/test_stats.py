"""GET /loops/{loop}/stats (issue 14): per-bucket figures from the joiner's rollups, checked
against what the test itself sent and against values known in closed form (a world where only
`tech` is rewarded: the baseline `news` is worth 0 and the random policy 1/3)."""

from __future__ import annotations

from typing import Any

import pytest

from learners.joiner import BACKWARD_WINDOW
from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness


def _stats(h: Harness, **params: str) -> dict[str, Any]:
    r = h.client.get("/loops/default/stats", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _traffic(h: Harness, n: int, start: int = 0) -> int:
    """`n` decisions, each rewarded at once: 1 for tech, else 0; returns how many got 1."""
    wins = 0
    for i in range(start, start + n):
        out = h.rank(rank_body(f"e{i}", contextFeatures=[{"n": i % 4}]))
        reward = 1.0 if out["rewardActionId"] == "tech" else 0.0
        wins += int(reward)
        h.reward(f"e{i}", reward)
    h.work()
    return wins


def test_buckets_count_what_was_sent_and_estimate_known_values(harness: Harness) -> None:
    harness.configure(modelExportFrequency="PT1S", explorationPercentage=0.3)
    wins = _traffic(harness, 200)
    harness.clock.advance(60)
    wins += _traffic(harness, 200, start=200)
    harness.clock.advance(2)
    harness.work()

    until = {"until": "2099-01-01T00:00:00Z", "since": "2026-01-01T00:00:00Z"}
    by_minute = _stats(harness, bucket="PT1M", **until)
    assert by_minute["bucketSeconds"] == 60
    buckets = by_minute["buckets"]
    assert [b["decisions"] for b in buckets] == [200, 200]
    assert [b["joined"] for b in buckets] == [200, 200]
    assert [b["rewarded"] for b in buckets] == [200, 200]
    assert all(b["defaulted"] == 0 for b in buckets)
    total_reward = sum(b["meanReward"]["all"] * b["joined"] for b in buckets)
    assert total_reward == pytest.approx(wins)
    # Everything is online: no holdout.
    assert all(b["meanReward"]["holdout"] is None for b in buckets)
    # Counterfactuals from the logged probabilities: the baseline (news) earns exactly nothing,
    # the random policy 1/3, inside its interval.
    for b in buckets:
        base, rand = b["counterfactual"]["baseline"], b["counterfactual"]["random"]
        assert base["estimate"] == 0.0
        lo, hi = rand["interval95"]
        assert lo <= 1 / 3 <= hi
        assert 0 < rand["effectiveSampleSize"] <= 200
        assert sum(b["actionShares"].values()) == pytest.approx(1.0)
        assert 0 <= b["explorationShare"] <= 1
    # The policy learns tech: its share grows from the first minute to the second.
    assert buckets[1]["actionShares"]["tech"] > buckets[0]["actionShares"]["tech"]

    # A coarser bucket adds the minutes up.
    hourly = _stats(harness, bucket="3600", **until)
    assert [b["decisions"] for b in hourly["buckets"]] == [400]
    assert hourly["buckets"][0]["joined"] == 400

    # Models published, with their freshness.
    assert by_minute["models"], by_minute
    assert by_minute["models"][-1]["examples"] == 400
    assert by_minute["freshness"]["p50"] is not None
    assert by_minute["since"] == "2026-01-01T00:00:00.000000Z"
    # The default range is the last 24 hours, in buckets as fine as the data allow (10 s).
    default = _stats(harness)
    assert default["bucketSeconds"] == 10
    assert sum(b["decisions"] for b in default["buckets"]) == 400
    assert default["buckets"][0]["start"] >= by_minute["buckets"][0]["start"]


def test_late_and_dangling_observations_are_counted(harness: Harness) -> None:
    harness.configure(rewardWaitTime="PT5S")
    harness.rank(rank_body("e1"))
    harness.clock.advance(6)
    harness.work()  # joined without a reward
    harness.reward("e1", 1.0)  # late
    harness.reward("ghost", 1.0)  # never ranked: dangling once its backward window passed
    harness.work()
    harness.clock.advance(BACKWARD_WINDOW + 1)
    harness.work()
    doc = _stats(harness)
    assert sum(b["late"] for b in doc["buckets"]) == 1
    assert sum(b["dangling"] for b in doc["buckets"]) == 1
    assert sum(b["defaulted"] for b in doc["buckets"] if "defaulted" in b) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"since": "yesterday"},
        {"until": "2026-13-01T00:00:00Z"},
        {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"bucket": "often"},
        {"bucket": "-60"},
        {"bucket": "PT0S"},
    ],
)
def test_bad_parameters_are_a_400(harness: Harness, params: dict[str, str]) -> None:
    r = harness.client.get("/loops/default/stats", params=params, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "InvalidRequest"


def test_too_many_buckets_is_a_400_but_a_wide_range_is_not(harness: Harness) -> None:
    harness.rank(rank_body("e1"))
    harness.work()
    wide = {"since": "2000-01-01T00:00:00Z", "until": "2099-01-01T00:00:00Z"}
    assert [b["decisions"] for b in _stats(harness, bucket="PT1M", **wide)["buckets"]] == [1]
    harness.clock.advance(3 * 86400)
    harness.rank(rank_body("e2"))
    harness.work()
    r = harness.client.get("/loops/default/stats", params={"bucket": "PT1M", **wide}, headers=AUTH)
    assert r.status_code == 400 and "at most 2000 buckets" in r.json()["error"]["message"]
    default = _stats(harness, **wide)  # the bucket chosen for the range: 3 days in <= 200
    assert default["bucketSeconds"] == 3600
    assert sum(b["decisions"] for b in default["buckets"]) == 2


def test_unknown_loop_and_no_key(harness: Harness) -> None:
    assert harness.client.get("/loops/nope/stats", headers=AUTH).status_code == 404
    assert harness.client.get("/loops/default/stats").status_code == 401


def test_rl_loops_report_episode_returns(harness: Harness) -> None:
    assert harness.client.put("/loops/tutor", json={"kind": "rl"}, headers=AUTH).status_code == 201
    base = "/loops/tutor/personalizer/v1.0"
    actions = [{"id": f"a{i}", "features": [{"a": i}]} for i in range(2)]
    returns = []
    for e in range(5):
        total = 0.0
        for step in range(3):
            event_id = f"ep{e}-{step}"
            body = {
                "contextFeatures": [{"s": step}],
                "actions": actions,
                "episodeId": f"ep{e}",
                "eventId": event_id,
            }
            assert harness.client.post(f"{base}/rank", json=body, headers=AUTH).status_code == 201
            value = 0.1 * (e + step)
            r = harness.client.post(
                f"{base}/events/{event_id}/reward", json={"value": value}, headers=AUTH
            )
            assert r.status_code == 204
            total += value
        r = harness.client.post(f"{base}/episodes/ep{e}/end", json={}, headers=AUTH)
        assert r.status_code == 204
        returns.append(total)
    harness.clock.advance(700)  # past the default 10-minute window
    harness.work()
    doc = harness.client.get("/loops/tutor/stats", headers=AUTH).json()
    episodes = [b["episodes"] for b in doc["buckets"] if "episodes" in b]
    assert sum(x["count"] for x in episodes) == 5
    mean = sum(x["meanReturn"] * x["count"] for x in episodes) / 5
    assert mean == pytest.approx(sum(returns) / 5)
    # A retrain (a new policy) relearns the episodes but does not count their returns again.
    policy = {"name": "slower", "arguments": "--cb_adf --cb_type mtr -q :: --power_t 0 -l 0.1"}
    r = harness.client.put(f"{base}/configurations/policy", json=policy, headers=AUTH)
    assert r.status_code == 200, r.text
    harness.work()
    again = harness.client.get("/loops/tutor/stats", headers=AUTH).json()
    assert sum(b["episodes"]["count"] for b in again["buckets"] if "episodes" in b) == 5


@pytest.mark.parametrize(
    "query",
    [
        "until=0001-01-01T00:00:01Z",  # since defaults to a day before: before year 1
        "until=0001-01-01T23:59:59Z",
        "since=2026-01-01T00:00:00Z&until=9999-12-31T23:59:59Z",
    ],
)
def test_a_range_past_the_dates_a_bucket_can_show_is_a_400(harness: Harness, query: str) -> None:
    r = harness.client.get(f"/loops/default/stats?{query}", headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "InvalidRequest"
