"""service.cli.offline: `dloop evaluate`, `replay` and `features` on an exported DSJSON file,
`evaluate` refusing policies that name files, and `dloop replay --apply` handing the loop a
model its learner continues (once the server, stopped for the offline command, is back)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from learners import vw
from service.cli import app
from service.pipeline.replay import replay_lines
from service.storage import store
from tests.support.files import assert_untouched
from tests.support.harness import Harness
from tests.support.sim import simulated_log

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


def test_cli_evaluate_refuses_file_options(tmp_path: Path, files: tuple[Path, Path]) -> None:
    existing, fresh = files
    log = tmp_path / "log.json"
    log.write_text("")
    for path in (existing, fresh):
        result = CliRunner().invoke(
            app,
            [
                "evaluate",
                "--source",
                str(log),
                "--data-dir",
                str(tmp_path / "none"),
                "--policy",
                f"x=--cb_explore_adf -f{path}",
            ],
        )
        assert result.exit_code == 2, result.output
    assert_untouched(existing, fresh)


@pytest.mark.slow
def test_cli_evaluates_replays_and_scores_features_from_a_dsjson_file(tmp_path: Path) -> None:
    lines, truth = simulated_log(4000)
    log = tmp_path / "exported.json"
    log.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    common = ["--source", str(log), "--data-dir", str(tmp_path / "none")]
    out = tmp_path / "evaluation.json"
    result = runner.invoke(
        app,
        [
            "evaluate",
            *common,
            "--policy",
            "eps=--cb_explore_adf --epsilon 0.1 -q ::",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4000 logged decisions" in result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[2:] if line.strip()}
    assert {"Online", "Baseline", "Random", "eps"} <= set(rows)
    doc = orjson.loads(out.read_bytes())
    baseline = next(v for v in doc["value"] if v["policySource"] == "Baseline")["summary"]
    lo, hi = baseline["confidenceInterval"]
    assert lo <= truth["Baseline"] <= hi

    since = ["--since", datetime.fromtimestamp(1_790_000_000 + 3000, UTC).isoformat()]
    result = runner.invoke(app, ["evaluate", *common, *since])
    assert "1000 logged decisions" in result.output

    model = tmp_path / "m.vw"
    args = ["--arguments", "--cb_explore_adf --squarecb -q ::", "--out", str(model)]
    result = runner.invoke(app, ["replay", *common, *args])
    assert result.exit_code == 0, result.output
    vw.check_model(model.read_bytes())

    result = runner.invoke(app, ["features", *common, "--top", "3"])
    assert result.exit_code == 0, result.output
    scored = re.findall(r"(\d\.\d{3})  (\S+)", result.output)  # (stderr has the bar)
    assert len(scored) == 3 and scored[0][0] == "1.000", result.output
