"""Named outcomes and reward definitions through the API (issue 15): outcomes declared in the
service configuration, sent in one or several calls (per slot in multi-slot loops), checked
(400 with Personalizer's error body), joined by their own aggregations into the training reward
the definition makes of them; definitions validated where they fail, versioned, recorded on each
joined event, and a change retrains the model on the loop's history relabelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import vowpalwabbit
from typer.testing import CliRunner

from service.cli import app
from service.storage import store
from service.storage.models import Joined
from tests.support.bodies import rank_body
from tests.support.harness import AUTH, Harness, joined

CFG = "/personalizer/v1.0/configurations/service"
OUTCOMES = [
    {"name": "click", "aggregation": "max", "min": 0, "max": 1},
    {"name": "purchase", "aggregation": "sum", "min": 0, "max": 1000},
    {"name": "unsubscribe", "min": 0, "max": 1},
]
DEFINITION = "min(1, click + purchase / 50) - coalesce(unsubscribe, 0)"


def _setup(h: Harness, definition: str | None = DEFINITION, **kw: Any) -> dict[str, Any]:
    return h.configure(outcomes=OUTCOMES, rewardDefinition=definition, **kw)


def _send(h: Harness, event_id: str, path: str = "/personalizer/v1.0", **values: Any) -> Any:
    return h.client.post(
        f"{path}/events/{event_id}/outcomes", json={"outcomes": values}, headers=AUTH
    )


def test_outcomes_join_into_the_definition_s_reward(harness: Harness) -> None:
    cfg = _setup(harness)
    assert cfg["rewardDefinition"] == DEFINITION
    assert cfg["rewardDefinitionVersion"] == 1
    assert [o["aggregation"] for o in cfg["outcomes"]] == ["max", "sum", "earliest"]
    harness.rank(rank_body("e1"))
    for values in ({"click": 0}, {"purchase": 10}, {"click": 1, "purchase": 5.5}):
        assert _send(harness, "e1", **values).status_code == 204
    harness.reward("e1", 0.9)  # Personalizer's reward is kept as the outcome `reward`
    harness.clock.advance(601)
    harness.work()
    line = joined(harness, "e1")
    assert line is not None
    assert line["Outcomes"] == {"click": 1.0, "purchase": 15.5, "reward": 0.9}
    assert line["_label_cost"] == pytest.approx(-1.0)  # min(1, 1 + 0.31) - 0
    assert line["RewardVersion"] == 1
    event = harness.client.get("/personalizer/v1.0/events/e1", headers=AUTH).json()
    assert event["reward"] == pytest.approx(1.0)
    assert event["rewardDefinitionVersion"] == 1
    assert [o.get("outcome") for o in event["observations"]] == [
        "click",
        "purchase",
        "click",
        "purchase",
        None,
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"outcomes": {"views": 1}}, "'views' is not configured"),
        ({"outcomes": {"click": 2}}, "between 0 and 1"),
        ({"outcomes": {"purchase": "9.99"}}, "finite number"),
        ({"outcomes": {"Bad-Name": 1}}, "outcome names are"),
        ({"outcomes": {}}, "non-empty object"),
        ({"outcome": {"click": 1}}, "non-empty object"),
        ([1, 2], "non-empty object"),
    ],
)
def test_bad_outcomes_are_a_400_with_the_reason(harness: Harness, body: Any, message: str) -> None:
    _setup(harness)
    r = harness.client.post("/personalizer/v1.0/events/e1/outcomes", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "InvalidOutcomeRequest"
    assert message in r.json()["error"]["message"]
    r = harness.client.post(
        "/personalizer/v1.0/events/e1/outcomes",
        content=b'{"outcomes": {"click": NaN}}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rewardDefinition": "click +"}, "rewardDefinition: syntax error: the formula ends"),
        ({"rewardDefinition": "click ** 2"}, "rewardDefinition: syntax error at column 8"),
        ({"rewardDefinition": "views"}, "rewardDefinition: unknown outcome(s): views"),
        ({"rewardDefinition": "purchase / 50"}, "outside the reward range [-1, 1]"),
        ({"rewardDefinition": "__import__('os')"}, "column 1"),
        ({"outcomes": [{"name": "reward", "min": 0, "max": 1}]}, "Personalizer's reward"),
        ({"outcomes": [{"name": "x", "min": 1, "max": 0}]}, "min below max"),
        ({"outcomes": [{"name": "x", "min": 0}]}, "outcomes.0.max"),
        ({"outcomes": [{"name": "x", "min": 0, "max": 1, "aggregation": "mode"}]}, "aggregation"),
        ({"outcomes": [{"name": "x", "min": 0, "max": 1}] * 2}, "unique"),
    ],
)
def test_bad_definitions_and_outcomes_are_a_400_that_says_where(
    harness: Harness, changes: dict[str, Any], message: str
) -> None:
    cfg = harness.client.get(CFG, headers=AUTH).json()
    r = harness.client.put(CFG, json={**cfg, "outcomes": OUTCOMES, **changes}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "InvalidServiceConfiguration"
    assert message in r.json()["error"]["message"]


def test_a_personalizer_client_s_update_keeps_dloop_s_settings(harness: Harness) -> None:
    """An SDK written for Personalizer drops fields it does not know: its updates must not
    reset the outcomes, the definition or the holdout."""
    _setup(harness, holdoutPercentage=10)
    cfg = harness.client.get(CFG, headers=AUTH).json()
    personalizer = {
        k: v
        for k, v in cfg.items()
        if k not in ("outcomes", "rewardDefinition", "rewardDefinitionVersion", "holdoutPercentage")
    }
    r = harness.client.put(CFG, json={**personalizer, "explorationPercentage": 0.3}, headers=AUTH)
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["rewardDefinition"] == DEFINITION
    assert after["rewardDefinitionVersion"] == 1  # unchanged: no new version, no retrain
    assert after["outcomes"] == cfg["outcomes"]
    assert after["holdoutPercentage"] == 10
    # Clearing the definition is explicit, and is a new version (Personalizer's reward).
    cleared = harness.configure(rewardDefinition=None)
    assert "rewardDefinition" not in cleared
    assert cleared["rewardDefinitionVersion"] == 2


def _train(h: Harness, n: int, start: int = 0) -> None:
    """Decisions where the app's click and purchase disagree: `sports` gets clicks, `tech`
    purchases (news neither)."""
    for i in range(start, start + n):
        out = h.rank(rank_body(f"e{i}"))
        chosen = out["rewardActionId"]
        if chosen == "sports":
            _send(h, f"e{i}", click=1, purchase=0)
        elif chosen == "tech":
            _send(h, f"e{i}", click=0, purchase=50)
        else:
            _send(h, f"e{i}", click=0, purchase=0)
    h.clock.advance(601)
    h.work()


def _greedy(h: Harness, probe: str) -> str:
    out = h.rank(rank_body(probe))
    best: str = max(out["ranking"], key=lambda a: a["probability"])["id"]
    return best


def test_a_new_definition_retrains_on_history_relabelled(harness: Harness) -> None:
    _setup(harness, definition="click")
    _train(harness, 300)
    assert _greedy(harness, "p1") == "sports"
    model_before = harness.client.get("/personalizer/v1.0/model", headers=AUTH).content
    cfg = harness.configure(rewardDefinition="clip(purchase / 50, 0, 1)")
    assert cfg["rewardDefinitionVersion"] == 2
    # The model was retrained at once on the same history under the new objective.
    assert harness.client.get("/personalizer/v1.0/model", headers=AUTH).content != model_before
    assert _greedy(harness, "p2") == "tech"
    with harness.dloop.sessions() as s:
        versions = store.reward_definitions(s, loop="default")
        assert [(v.version, v.definition) for v in versions] == [
            (1, "click"),
            (2, "clip(purchase / 50, 0, 1)"),
        ]
        old = {r.reward_version for r in s.query(Joined)}
    assert old == {1}  # rows keep the version they were joined with
    _train(harness, 20, start=1000)
    with harness.dloop.sessions() as s:
        assert {r.reward_version for r in s.query(Joined).filter(Joined.seq > 300)} == {2}
    stats = harness.client.get("/loops/default/stats", headers=AUTH).json()
    assert [(c["version"], c["definition"]) for c in stats["rewardDefinitions"]] == [
        (1, "click"),
        (2, "clip(purchase / 50, 0, 1)"),
    ]


def test_multi_slot_outcomes_per_slot(harness: Harness) -> None:
    r = harness.client.put("/loops/page", json={"kind": "ccb"}, headers=AUTH)
    assert r.status_code == 201, r.text
    base = "/loops/page/personalizer/v1.0"
    cfg = harness.client.get(f"{base}/configurations/service", headers=AUTH).json()
    cfg.update(outcomes=OUTCOMES, rewardDefinition="clip(click - coalesce(unsubscribe, 0), -1, 1)")
    assert (
        harness.client.put(f"{base}/configurations/service", json=cfg, headers=AUTH).status_code
        == 200
    )
    body = {
        "eventId": "m1",
        "contextFeatures": [{"u": "a"}],
        "actions": [{"id": a, "features": [{"t": a}]} for a in ("x", "y", "z")],
        "slots": [{"id": "top", "baselineAction": "x"}, {"id": "side", "baselineAction": "y"}],
    }
    assert harness.client.post(f"{base}/multislot/rank", json=body, headers=AUTH).status_code == 201
    sent = {
        "outcomes": [
            {"slotId": "top", "outcomes": {"click": 1}},
            {"slotId": "side", "outcomes": {"click": 1, "unsubscribe": 1}},
        ]
    }
    r = harness.client.post(f"{base}/multislot/events/m1/outcomes", json=sent, headers=AUTH)
    assert r.status_code == 204, r.text
    bad = {"outcomes": [{"slotId": "top", "outcomes": {"click": 5}}]}
    r = harness.client.post(f"{base}/multislot/events/m1/outcomes", json=bad, headers=AUTH)
    assert r.status_code == 400
    assert "outcomes[0].outcomes: outcome 'click'" in r.json()["error"]["message"]
    r = harness.client.post(f"{base}/events/m1/outcomes", json=sent, headers=AUTH)
    assert r.status_code == 400  # a multi-slot loop's outcomes are per slot
    harness.clock.advance(601)
    harness.work()
    line = joined(harness, "m1")
    assert line is not None
    assert [s["Outcomes"] for s in line["_outcomes"]] == [
        {"click": 1.0},
        {"click": 1.0, "unsubscribe": 1.0},
    ]
    assert [s["_label_cost"] for s in line["_outcomes"]] == [-1.0, 0.0]


def test_exported_logs_with_outcomes_parse_in_vw(harness: Harness, tmp_path: Path) -> None:
    """`dloop logs export` keeps every outcome, raw and aggregated, in lines VW's --dsjson
    parser reads with their labels."""
    _setup(harness)
    _train(harness, 30)
    out_file = tmp_path / "export.json"
    result = CliRunner().invoke(
        app,
        [
            "logs",
            "export",
            "--data-dir",
            str(harness.dloop.settings.data_dir),
            "--out",
            str(out_file),
        ],
        env={"DLOOP_API_KEY": "export-test-key-0123456789abcdefghij"},
    )
    assert result.exit_code == 0, result.output
    lines = out_file.read_text().splitlines()
    assert len(lines) == 30
    ws = vowpalwabbit.Workspace("--cb_explore_adf --dsjson --quiet")
    for text in lines:
        doc = orjson.loads(text)
        assert set(doc["Outcomes"]) == {"click", "purchase"}
        assert {o["Outcome"] for o in doc["o"]} == {"click", "purchase"}
        examples = ws.parse(text)
        costs = [c.cost for ex in examples[1:] for c in ex.get_label().costs]
        assert costs == [doc["_label_cost"]]  # the chosen action's label, as joined
        ws.learn(examples)
        ws.finish_example(examples)
