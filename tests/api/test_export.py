"""Export round trip: `dloop logs export` writes lines VW's --dsjson reader takes, with the
counts and labels the API returned and the rewards sent."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import vowpalwabbit
from typer.testing import CliRunner

from service.cli import app
from tests.support.bodies import rank_body
from tests.support.harness import Harness


def test_export_round_trip(harness: Harness, tmp_path: Path) -> None:
    harness.configure(rewardWaitTime="PT10S", defaultReward=0.0)
    responses = {}
    rewards = {}
    for i in range(60):
        deferred = i % 10 == 0
        out = harness.rank(rank_body(f"ex{i}", deferActivation=deferred))
        responses[f"ex{i}"] = out
        if i % 3:
            value = round((i % 7) / 7, 3)
            harness.reward(f"ex{i}", value)
            rewards[f"ex{i}"] = value
    harness.clock.advance(11)
    harness.work()

    out_file = tmp_path / "export.json"
    data_dir = harness.dloop.settings.data_dir
    result = CliRunner().invoke(
        app,
        ["logs", "export", "--data-dir", str(data_dir), "--out", str(out_file)],
        env={"DLOOP_API_KEY": "export-test-key-0123456789abcdefghij"},
    )
    assert result.exit_code == 0, result.output
    lines = out_file.read_text().splitlines()
    assert len(lines) == 60

    ws = vowpalwabbit.Workspace("--cb_explore_adf --dsjson --quiet")
    learnable = 0
    for text in lines:
        line = orjson.loads(text)
        event_id = line["EventId"]
        api = responses[event_id]
        ids = [a["_tag"] for a in line["c"]["_multi"]]
        assert [ids[i - 1] for i in line["a"]] == [a["id"] for a in api["ranking"]]
        assert line["p"] == [a["probability"] for a in api["ranking"]]
        assert line["_label_cost"] == -rewards.get(event_id, 0.0)
        examples = ws.parse(text)
        if line.get("_skipLearn"):
            assert event_id in {f"ex{i}" for i in range(0, 60, 10)}
        else:
            learnable += 1
            chosen = line["_labelIndex"]
            labels = [ex.get_label().costs for ex in examples[1:]]
            assert [i for i, c in enumerate(labels) if c] == [chosen]
            assert ids[chosen] == api["rewardActionId"]
        ws.finish_example(examples)
    assert learnable == 54  # six deferred events were never activated


@pytest.mark.slow
def test_a_model_replayed_from_exported_logs_ranks_like_the_live_one(
    harness: Harness, tmp_path: Path
) -> None:
    from learners.cb import CBRanker
    from learners.features import context_json
    from learners.sim.worlds import CBWorld

    world = CBWorld(n_actions=4, seed=2)
    harness.configure(rewardWaitTime="PT5S", modelExportFrequency="PT1S")
    for i in range(800):
        values, features = world.draw_context()
        r = harness.rank(
            {"contextFeatures": features, "actions": world.actions(), "eventId": f"l{i}"}
        )
        harness.reward(f"l{i}", world.reward(values, world.action_ids.index(r["rewardActionId"])))
        if i % 100 == 99:
            harness.clock.advance(2)
            harness.work()
    harness.clock.advance(10)
    harness.work()
    out_file = tmp_path / "export.json"
    data_dir = harness.dloop.settings.data_dir
    runner = CliRunner()
    assert (
        runner.invoke(
            app, ["logs", "export", "--data-dir", str(data_dir), "--out", str(out_file)]
        ).exit_code
        == 0
    )
    model = tmp_path / "replayed.vw"
    result = runner.invoke(
        app, ["replay", "--source", str(out_file), "--data-dir", str(data_dir), "--out", str(model)]
    )
    assert result.exit_code == 0, result.output
    served = harness.dloop.registry.loops["default"].served
    assert served.path is not None
    live = CBRanker(Path(served.path).read_bytes())
    replayed = CBRanker(model.read_bytes())
    actions = [(a["id"], a["features"]) for a in world.actions()]
    for _ in range(50):
        _, features = world.draw_context()
        context = context_json(features, actions)
        assert replayed.predict(context) == live.predict(context)
    result = runner.invoke(app, ["features", "--quick", "--data-dir", str(data_dir), "--top", "5"])
    assert result.exit_code == 0, result.output
    assert "1.000" in result.output and "country" in result.output
    result = runner.invoke(
        app, ["features", "--quick", "--loop", "nope", "--data-dir", str(data_dir)]
    )
    assert result.exit_code != 0
