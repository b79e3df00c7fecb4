"""The embedded worker (service.pipeline.embedded) under the in-process app: the reward join
as Personalizer defines it (window, aggregation, default reward, orphans, deferred activation),
dangling observations, dead letters, retention, a backlog, the model id in joined lines; a loop
that cannot learn or is deleted mid-pass; a pass that fails mid-learning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.app import create_app
from service.storage.models import Joined, ModelCheckpoint, Observation
from tests.support.bodies import body, rank_body
from tests.support.harness import AUTH, FakeClock, Harness, joined, make_settings
from tests.support.pipeline import FlakySessions, running, wait_for
from tests.support.records import dsjson


def test_reward_joins_and_default_applies_after_the_window(harness: Harness) -> None:
    harness.configure(rewardWaitTime="PT60S", rewardAggregation="sum", defaultReward=-0.5)
    harness.rank(rank_body("rewarded"))
    harness.rank(rank_body("silent"))
    harness.reward("rewarded", 0.4)
    harness.reward("rewarded", 0.4)
    harness.work()
    assert joined(harness, "rewarded") is None  # sum waits for the window to close
    harness.clock.advance(61)
    harness.reward("rewarded", 1.0)  # late: after the window
    harness.work()
    assert joined(harness, "rewarded")["_label_cost"] == pytest.approx(-0.8)  # type: ignore[index]
    assert joined(harness, "silent")["_label_cost"] == pytest.approx(0.5)  # type: ignore[index]
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert 'dloop_observations_late{loop="default"} 1' in metrics


def test_earliest_joins_at_the_first_reward(harness: Harness) -> None:
    harness.rank(rank_body("fast"))
    harness.clock.advance(1)
    harness.reward("fast", 1.0)
    harness.work()
    line = joined(harness, "fast")
    assert line is not None and line["_label_cost"] == -1.0
    harness.reward("fast", 0.0)
    harness.work()
    assert joined(harness, "fast")["_label_cost"] == -1.0  # type: ignore[index]


def test_a_shorter_reward_wait_applies_to_decisions_already_waiting(harness: Harness) -> None:
    """The worker looks at a loop again when its decisions' windows close: a configuration
    that shortens the wait must move that moment (the worker kept the old one)."""
    harness.configure(rewardWaitTime="PT10M", defaultReward=0.25)
    harness.rank(rank_body("waiting"))
    harness.work()
    harness.configure(rewardWaitTime="PT5S", defaultReward=0.25)
    harness.clock.advance(6)
    harness.work()
    assert joined(harness, "waiting")["_label_cost"] == -0.25  # type: ignore[index]


def test_orphan_reward_joins_when_its_decision_arrives(harness: Harness) -> None:
    harness.reward("orphan", 1.0)
    harness.work()
    harness.clock.advance(30)
    harness.rank(rank_body("orphan"))
    harness.work()
    assert joined(harness, "orphan")["_label_cost"] == -1.0  # type: ignore[index]


def test_dangling_reward_is_counted(harness: Harness) -> None:
    harness.reward("never-ranked", 1.0)
    harness.work()
    harness.clock.advance(121)
    harness.work()
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert 'dloop_observations_dangling{loop="default"} 1' in metrics


def test_dangling_observations_are_bounded_per_loop(tmp_path: Path, clock: FakeClock) -> None:
    settings = make_settings(tmp_path / "data", max_dangling=3)
    with TestClient(create_app(settings, clock=clock, run_worker=False)) as client:
        harness = Harness(client, clock)
        harness.client.put("/loops/other", json={"kind": "cb"}, headers=AUTH)
        for i in range(5):
            harness.reward(f"unknown{i}", 1.0)
            clock.advance(1)
        r = client.post(
            "/loops/other/personalizer/v1.0/events/x/reward", json={"value": 1}, headers=AUTH
        )
        assert r.status_code == 204
        clock.advance(121)
        harness.work()
        metrics = client.get("/metrics", headers=AUTH).text
        assert 'dloop_observations_dangling{loop="default"} 3' in metrics
        assert 'dloop_observations_dropped{loop="default"} 2' in metrics
        assert 'dloop_observations_dangling{loop="other"} 1' in metrics
        for i in range(5, 7):
            harness.reward(f"unknown{i}", 1.0)
        clock.advance(121)
        harness.work()
        metrics = client.get("/metrics", headers=AUTH).text
        assert 'dloop_observations_dropped{loop="default"} 4' in metrics
        with harness.dloop.sessions() as session:
            kept = session.scalars(
                select(Observation.event_id).where(
                    Observation.loop == "default", Observation.status == "dangling"
                )
            ).all()
        assert sorted(kept) == ["unknown4", "unknown5", "unknown6"]  # the newest


def test_deferred_event_learns_only_when_activated(harness: Harness) -> None:
    harness.configure(rewardWaitTime="PT60S")
    harness.rank(rank_body("shown", deferActivation=True))
    harness.rank(rank_body("hidden", deferActivation=True))
    r = harness.client.post("/personalizer/v1.0/events/shown/activate", headers=AUTH)
    assert r.status_code == 204
    harness.reward("hidden", 1.0)
    harness.clock.advance(61)
    harness.work()
    assert "_skipLearn" not in joined(harness, "shown")  # type: ignore[operator]
    assert joined(harness, "hidden")["_skipLearn"] is True  # type: ignore[index]


def test_unreadable_log_records_go_to_dead_letters(harness: Harness) -> None:
    harness.dloop.log.append(b'{"k":"d","loop":"default"')  # torn JSON
    harness.dloop.log.append(b'{"k":"x","loop":"default","id":"e","t":1}')  # unknown kind
    harness.dloop.log.append(b'{"k":"d","loop":"default","id":"e","t":1}')  # fields missing
    harness.rank(rank_body("after"))
    harness.reward("after", 1.0)
    harness.work()
    assert joined(harness, "after") is not None  # the worker moved on
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert "dloop_dead_letters 3" in metrics


def test_log_retention_drops_old_events(harness: Harness) -> None:
    harness.configure(logRetentionDays=2, modelRetrainDays=0)
    harness.rank(rank_body("old"))
    harness.reward("old", 1.0)
    harness.work()
    assert joined(harness, "old") is not None
    harness.clock.advance(2 * 86400 + 601)
    harness.rank(rank_body("new"))
    harness.reward("new", 1.0)
    harness.work()
    assert joined(harness, "old") is None and joined(harness, "new") is not None


def test_a_worker_behind_on_the_log_closes_no_window_before_reading_its_rewards(
    harness: Harness,
) -> None:
    # A backlog (the worker was down for a while): the rewards sit later in the log than
    # decisions whose windows the wall clock already closed.
    harness.configure(rewardWaitTime="PT5S", rewardAggregation="sum")
    for i in range(30):
        harness.rank(rank_body(f"b{i}"))
    harness.clock.advance(2)
    for i in range(30):
        harness.reward(f"b{i}", 1.0)
    harness.clock.advance(3600)
    worker = harness.dloop.worker
    assert worker is not None
    worker.read_bytes = 2048  # a few records per pass
    harness.work()
    for i in range(30):
        assert joined(harness, f"b{i}")["_label_cost"] == -1.0, i  # type: ignore[index]


def test_a_model_is_published_and_logged_in_vwstate(harness: Harness) -> None:
    harness.configure(modelExportFrequency="PT1S")
    harness.rank(rank_body("m1"))
    harness.reward("m1", 1.0)
    harness.clock.advance(2)
    harness.work()
    model_id = harness.dloop.registry.loops["default"].model_id
    assert model_id != "N/A"
    harness.rank(rank_body("m2"))
    harness.reward("m2", 1.0)
    harness.work()
    assert joined(harness, "m1")["VWState"] == {"m": "N/A"}  # type: ignore[index]
    assert joined(harness, "m2")["VWState"] == {"m": model_id}  # type: ignore[index]


def test_the_embedded_worker_whose_database_fails_mid_learning_learns_every_row_once(
    harness: Harness,
) -> None:
    """The embedded worker reads its log offset inside the ingest transaction, so it cannot
    skip records; but a pass that fails after the trainer learned (here: writing the dead
    letter of a line VW refused) must not leave those lines learned in memory to be learned
    again."""
    h = harness
    h.configure(rewardWaitTime="PT1S", modelExportFrequency="PT1S")
    worker = h.dloop.worker
    assert worker is not None
    with h.dloop.sessions.begin() as session:  # joined seq 1: a line VW refuses
        session.add(
            Joined(
                loop="default",
                event_id="p1",
                created_at=h.clock(),
                joined_at=h.clock(),
                mode="Online",
                learnable=True,
                reward=1.0,
                rewarded=True,
                imitated=False,
                line=dsjson([{"_multi": []}]),
                published=False,
            )
        )
    for i in range(3):
        assert (
            h.client.post(
                "/personalizer/v1.0/rank", json=body(f"e{i}", [{"a": i}]), headers=AUTH
            ).status_code
            == 201
        )
        h.reward(f"e{i}", 1.0)
    h.clock.advance(5)

    def learned_something() -> bool:
        learner = worker.learners.get("default")
        return learner is not None and learner.trainer.examples > 0

    worker.sessions = FlakySessions(worker.sessions, learned_something)  # type: ignore[assignment]

    def exported() -> bool:
        with h.dloop.sessions() as session:
            ckpt = session.get(ModelCheckpoint, "default")
            return ckpt is not None and ckpt.position == 4

    with running(worker):
        wait_for(exported, "the loop's model to be exported")
    assert worker.sessions.failed == 1  # type: ignore[attr-defined]
    with h.dloop.sessions() as session:
        ckpt = session.get(ModelCheckpoint, "default")
        assert ckpt is not None and ckpt.examples == 3  # the three good rows, once


def test_a_loop_that_cannot_learn_is_reported_and_the_others_learn(harness: Any) -> None:
    from service.storage.models import Loop as LoopRow

    h = harness
    assert h.client.put("/loops/broken", json={}, headers=AUTH).status_code == 201
    for prefix in ("", "/loops/broken"):
        path = f"{prefix}/personalizer/v1.0/configurations/service"
        cfg = h.client.get(path, headers=AUTH).json()
        cfg.update(rewardWaitTime="PT1S", modelExportFrequency="PT1S")
        assert h.client.put(path, json=cfg, headers=AUTH).status_code == 200
    # A policy VW refuses, as a database edited by hand (or an older dloop) could hold.
    with h.dloop.sessions.begin() as session:
        row = session.get(LoopRow, "broken")
        row.policy = {"name": "bad", "arguments": "--cb_explore_adf --no_such_option 3"}
    with h.dloop.sessions() as session:
        h.dloop.registry.load(session)
    for prefix in ("", "/loops/broken"):
        for i in range(3):
            r = h.client.post(
                f"{prefix}/personalizer/v1.0/rank", json=body(f"e{i}", [{"a": 1}]), headers=AUTH
            )
            assert r.status_code == 201, r.text
            h.client.post(
                f"{prefix}/personalizer/v1.0/events/e{i}/reward", json={"value": 1}, headers=AUTH
            )
    h.clock.advance(5)
    h.work()
    assert h.dloop.registry.loops["default"].model_id != "N/A"  # the healthy loop learned
    ready = h.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    failing = ready.json()["failingLoops"]
    assert [f["loop"] for f in failing] == ["broken"] and "no_such_option" in failing[0]["error"]
    metrics = h.client.get("/metrics", headers=AUTH).text
    assert 'dloop_learner_failing{loop="broken"} 1' in metrics
    # it backs off: passes right after skip it, a later one tries it again
    h.work()
    assert h.dloop.worker is not None and h.dloop.worker.failing["broken"].failures == 1
    h.clock.advance(10)
    h.work()
    assert h.dloop.worker.failing["broken"].failures == 2


def test_a_loop_deleted_during_a_pass_stops_nothing(
    harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.storage import store

    h = harness
    assert h.client.put("/loops/gone", json={}, headers=AUTH).status_code == 201
    for prefix in ("", "/loops/gone"):
        r = h.client.post(
            f"{prefix}/personalizer/v1.0/rank", json=body("e1", [{"a": 1}]), headers=AUTH
        )
        assert r.status_code == 201
        h.client.post(
            f"{prefix}/personalizer/v1.0/events/e1/reward", json={"value": 1}, headers=AUTH
        )
    next_join_at = store.next_join_at

    def join_then_delete(session: Any, *, loop: str, **kw: Any) -> tuple[float | None, bool]:
        at = next_join_at(session, loop=loop, **kw)
        if loop == "gone":  # the API deletes the loop while the worker is inside its pass
            assert h.client.delete("/loops/gone", headers=AUTH).status_code == 204
        return at

    monkeypatch.setattr(store, "next_join_at", join_then_delete)
    h.clock.advance(700)
    h.work()
    with h.dloop.sessions() as session:
        assert store.get_checkpoint(session, loop="default") is not None
    assert "gone" not in h.dloop.registry.loops
