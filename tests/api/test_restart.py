"""The app stopped and started again on the same data dir (in-process, TestClient): it loses
nothing and learns nothing twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.app import create_app
from service.storage.models import Joined, ModelCheckpoint
from tests.support.bodies import rank_body
from tests.support.harness import FakeClock, Harness, make_settings


def probabilities(ranked: dict[str, Any]) -> dict[str, float]:
    return {a["id"]: a["probability"] for a in ranked["ranking"]}


def test_restart_keeps_pending_events_and_the_model(tmp_path: Path) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path / "data")

    with TestClient(create_app(settings, clock=clock, run_worker=False)) as client:
        h = Harness(client, clock)
        h.configure(modelExportFrequency="PT1S", rewardWaitTime="PT60S", rewardAggregation="sum")
        for i in range(40):
            chosen = h.rank(rank_body(f"a{i}"))["rewardActionId"]
            h.reward(f"a{i}", 1.0 if chosen == "sports" else 0.0)
        clock.advance(61)
        h.work()  # joins and learns the first 40, exports a model
        model_id = h.dloop.registry.loops["default"].model_id
        assert model_id != "N/A"
        learned = probabilities(h.rank(rank_body("probe-before")))
        assert max(learned, key=learned.__getitem__) == "sports"
        for i in range(40, 70):  # pending at shutdown: logged, not yet ingested
            h.rank(rank_body(f"a{i}"))
        for i in range(40, 50):
            h.reward(f"a{i}", 0.5)

    with TestClient(create_app(settings, clock=clock, run_worker=False)) as client:
        h = Harness(client, clock)
        assert h.dloop.registry.loops["default"].model_id == model_id  # serves the saved model
        # The same model: the same probabilities, to the bit, for the same context.
        assert probabilities(h.rank(rank_body("probe-after"))) == learned
        clock.advance(61)
        h.work()
        with h.dloop.sessions() as s:
            joined = s.scalar(select(func.count()).select_from(Joined))
            rewarded = s.scalar(select(func.count()).where(Joined.rewarded.is_(True)))
            ckpt = s.get(ModelCheckpoint, "default")
            assert ckpt is not None
            # every learnable joined event learned exactly once across the restart
            assert ckpt.examples == joined
        assert joined == 72 and rewarded == 50
