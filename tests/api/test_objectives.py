"""The same history, another objective (issue 15): on a simulated shop with three outcomes
(click, purchase value, unsubscribe) whose expected values are known for every user and offer
(learners.sim.worlds.ShopWorld), one evaluation compares the online policy, the baseline, random
and two custom policies trained for different objectives, and reports every outcome for each:
the true values (computed from the policies' own probabilities on the logged users) lie in the
reported 95% intervals, and the table shows the trade-off (the revenue policy sells more, the
click policy gets more clicks)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from learners import evaluation, vw
from learners.features import context_json
from learners.sim.worlds import ShopWorld
from service.cli import app
from service.core.schemas import offline_rules
from service.pipeline.evaluations import policy_specs
from service.storage import store
from service.storage.models import Loop
from tests.support.harness import AUTH, Harness

OUTCOMES = [
    {"name": "click", "aggregation": "max", "min": 0, "max": 1},
    {"name": "purchase", "aggregation": "sum", "min": 0, "max": 500},
    {"name": "unsubscribe", "min": 0, "max": 1},
]
REVENUE = "clip(purchase / 120, 0, 1)"
ARGS = "--cb_explore_adf --epsilon 0.05 -q ::"
WINDOW = {"startTime": "2000-01-01T00:00:00Z", "endTime": "2100-01-01T00:00:00Z"}


def _log(h: Harness, world: ShopWorld, n: int) -> None:
    """n decisions of a loop trained for clicks, exploring half the time, and their outcomes."""
    h.configure(
        outcomes=OUTCOMES,
        rewardDefinition="click",
        explorationPercentage=0.5,
        rewardWaitTime="PT10S",
    )
    policy = {"name": "explore", "arguments": "--cb_explore_adf --epsilon 0.5 -q ::"}
    r = h.client.put("/personalizer/v1.0/configurations/policy", json=policy, headers=AUTH)
    assert r.status_code == 200, r.text
    actions = world.actions()
    for i in range(n):
        segment, context = world.draw_context()
        out = h.rank({"eventId": f"e{i}", "contextFeatures": context, "actions": actions})
        offer = world.offers.index(out["rewardActionId"])
        drawn = world.outcomes(segment, offer)
        sent = {k: v for k, v in drawn.items() if v or k == "click"}  # purchases/unsubscribes
        r = h.client.post(
            f"/personalizer/v1.0/events/e{i}/outcomes", json={"outcomes": sent}, headers=AUTH
        )
        assert r.status_code == 204, r.text
        if i % 500 == 499:
            h.clock.advance(11)
            h.work()
    h.clock.advance(11)
    h.work()


def _truth(h: Harness, world: ShopWorld, policies: list[dict[str, Any]]) -> dict[str, Any]:
    """Each policy's true expected outcomes on the logged users: the same policies scored on
    the same lines in the same order (the evaluation's progressive scorers are deterministic),
    and the world's expected outcomes under their probabilities."""
    with h.dloop.sessions() as s:
        loop = s.get(Loop, "default")
        assert loop is not None
        specs = policy_specs(loop, policies, False)
        lines = list(store.export_lines(s, loop="default"))
    logged = evaluation.read(lines)
    segments = [
        world.segments.index(orjson.loads(d.line)["c"]["FromUrl"][0]["segment"]) for d in logged
    ]
    truth = {}
    for spec in specs:
        score = evaluation.FIXED.get(spec.source) or evaluation.Progressive(
            spec.arguments, spec.rules
        )
        pmfs = [(s, score(d)) for s, d in zip(segments, logged, strict=True)]
        truth[spec.name] = world.value(pmfs)
    return truth


@pytest.mark.slow
def test_one_evaluation_shows_the_trade_off_between_objectives(harness: Harness) -> None:
    world = ShopWorld(seed=1)
    _log(harness, world, 3000)
    policies = [
        {"name": "for-revenue", "arguments": ARGS, "rewardDefinition": REVENUE},
        {"name": "for-clicks", "arguments": ARGS, "rewardDefinition": "click"},
    ]
    r = harness.client.put(
        "/personalizer/v1.0/evaluations/objectives",
        json={"name": "objectives", **WINDOW, "policies": policies},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    harness.dloop.jobs._pool.shutdown(wait=True)
    doc = harness.client.get("/personalizer/v1.0/evaluations/objectives", headers=AUTH).json()
    assert doc["status"] == "Succeeded", doc
    table = {v["name"]: v["summary"]["outcomes"] for v in doc["content"]["value"]}
    assert set(table) == {"explore", "Baseline", "Random", "for-revenue", "for-clicks"}
    truth = _truth(harness, world, policies)
    for name, outcomes in table.items():  # the figures the README quotes (pytest -s)
        cells = [
            f"{o} {e['expected']:.3f} (true {truth[name][o]:.3f})" for o, e in outcomes.items()
        ]
        print(f"\n{name:12} " + ", ".join(cells), end="")
    misses = []
    for name, outcomes in table.items():
        assert set(outcomes) == {"click", "purchase", "unsubscribe"}
        for outcome, est in outcomes.items():
            low, high = est["confidenceInterval"]
            if not low <= truth[name][outcome] <= high:
                misses.append((name, outcome, truth[name][outcome], est))
    assert not misses
    # The trade-off, in the estimates and in the truth alike.
    for values in (
        {n: {o: e["expected"] for o, e in t.items()} for n, t in table.items()},
        truth,
    ):
        assert values["for-revenue"]["purchase"] > 1.5 * values["for-clicks"]["purchase"]
        assert values["for-clicks"]["click"] > 1.5 * values["for-revenue"]["click"]
    # The training reward column is the loop's objective (clicks) for every policy.
    clicks = {v["name"]: v["summary"]["expectedReward"] for v in doc["content"]["value"]}
    assert clicks["for-clicks"] > clicks["for-revenue"]


def test_offline_rules_check_against_the_loop_s_outcomes(harness: Harness) -> None:
    harness.configure(outcomes=OUTCOMES)
    bad = {
        "name": "x",
        **WINDOW,
        "policies": [{"name": "p", "arguments": ARGS, "rewardDefinition": "views"}],
    }
    r = harness.client.put("/personalizer/v1.0/evaluations/bad", json=bad, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "code": "InvalidEvaluationContract",
        "message": "p: rewardDefinition: unknown outcome(s): views",
    }
    r = harness.client.put(
        "/personalizer/v1.0/evaluations/bad2",
        json={"name": "x", **WINDOW, "rewardDefinition": "purchase"},
        headers=AUTH,
    )
    assert r.status_code == 400
    assert "outside the reward range" in r.json()["error"]["message"]
    cfg = harness.client.get("/personalizer/v1.0/configurations/service", headers=AUTH).json()
    rules = offline_rules(cfg, REVENUE)
    assert rules.reward({"purchase": 240.0}) == (1.0, True)


def test_cli_evaluates_and_replays_under_another_objective(harness: Harness) -> None:
    """`dloop evaluate --reward/--policy-reward` prints the policies x outcomes table;
    `dloop replay --reward ... --apply` makes a model trained for revenue the loop's model."""
    world = ShopWorld(seed=2)
    _log(harness, world, 1500)
    data = str(harness.dloop.settings.data_dir)
    env = {"DLOOP_API_KEY": "cli-test-key-0123456789abcdefghijkl"}
    policies = ["--policy", f"for-clicks={ARGS}", "--policy", f"for-revenue={ARGS}"]
    objective = ["--policy-reward", f"for-revenue={REVENUE}"]
    result = CliRunner().invoke(
        app, ["evaluate", "--data-dir", data, "--reward", REVENUE, *policies, *objective], env=env
    )
    assert result.exit_code == 0, result.output
    assert "Outcomes per policy" in result.output
    table = result.output.split("Outcomes per policy")[1].splitlines()
    header = next(ln for ln in table if ln.startswith("policy "))
    assert header.split() == ["policy", "training", "reward", "click", "purchase", "unsubscribe"]
    rows = {ln.split()[0]: ln for ln in table if ln.startswith("for-")}
    assert set(rows) == {"for-clicks", "for-revenue"}
    bad = CliRunner().invoke(app, ["evaluate", "--data-dir", data, "--reward", "views"], env=env)
    assert bad.exit_code != 0
    assert "unknown outcome(s): views" in bad.output
    # Replay for revenue and make it the loop's model: loyal users get the premium offer, where
    # the loop's own (click) model shows them clickbait.
    ids = list(world.offers)

    def greedy(model: bytes | None) -> str:
        assert model is not None
        ws = vw.workspace("--json", model)
        c = context_json(
            [{"segment": "loyal"}], [(a["id"], a["features"]) for a in world.actions()]
        )
        scores = vw.predict_scores(ws, c.decode())
        return ids[max(range(len(ids)), key=lambda i: scores[i])]

    with harness.dloop.sessions() as s:
        before = store.get_checkpoint(s, loop="default")
        assert before is not None and greedy(before.model) == "clickbait"
    result = CliRunner().invoke(
        app, ["replay", "--data-dir", data, "--reward", REVENUE, "--apply"], env=env
    )
    assert result.exit_code == 0, result.output
    with harness.dloop.sessions() as s:
        after = store.get_checkpoint(s, loop="default")
        assert after is not None and after.model_id != before.model_id
        assert greedy(after.model) == "premium"
