"""Export round trip: `dloop logs export` writes lines VW's --dsjson reader takes, with the
counts and labels the API returned and the rewards sent."""

from __future__ import annotations

from pathlib import Path

import orjson
import vowpalwabbit
from typer.testing import CliRunner

from service.cli import app
from tests.conftest import Harness
from tests.test_api import rank_body


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
        env={"DLOOP_API_KEY": "x"},
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
