"""service.cli.offline: `dloop replay --apply` hands the loop a model its learner continues
(once the server, stopped for the offline command, is back)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from service.cli import app
from service.pipeline.replay import replay_lines
from service.storage import store
from tests.conftest import Harness

ACTIONS = [{"id": a, "features": [{"a": a}]} for a in ("x", "y", "z")]


def rank_and_reward(harness: Harness, prefix: str, n: int) -> None:
    for i in range(n):
        body = {"eventId": f"{prefix}{i}", "contextFeatures": [{"u": i % 3}], "actions": ACTIONS}
        ranked = harness.rank(body)
        harness.reward(ranked["eventId"], 1.0 if ranked["rewardActionId"] == "x" else 0.0)
    harness.clock.advance(3600)  # every reward window closes
    harness.work()


def test_a_replayed_model_applied_to_a_loop_is_continued_by_its_learner(
    harness: Harness, tmp_path: Path
) -> None:
    rank_and_reward(harness, "a", 20)
    result = CliRunner().invoke(
        app, ["replay", "--loop", "default", "--data-dir", str(tmp_path / "data"), "--apply"]
    )
    assert result.exit_code == 0, result.output
    d = harness.dloop
    with d.sessions() as session:
        applied = store.get_checkpoint(session, loop="default")
        assert applied is not None and applied.model is not None
        # The arguments the loop trains (its policy with its exploration), so its learner
        # continues the model instead of starting a blank one.
        assert applied.arguments == d.registry.loops["default"].arguments
    assert d.worker is not None
    d.worker.learning.drop_all()  # as a restart of `dloop up` after the offline command
    rank_and_reward(harness, "b", 5)
    with d.sessions() as session:
        continued = store.get_checkpoint(session, loop="default")
        assert continued is not None and continued.model_id != applied.model_id
        assert continued.examples == applied.examples + 5
        b_lines = [
            line for line in store.export_lines(session, loop="default") if '"EventId":"b' in line
        ]
    # Continued, not started afresh: a blank model learning only the 5 new events is another.
    afresh = replay_lines(b_lines, d.registry.loops["default"].arguments, progress=False)
    assert len(b_lines) == 5 and continued.model != afresh
