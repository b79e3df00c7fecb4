"""Multi-slot loops (kind ccb) through service.api.routes.multislot: Personalizer's /multislot
API, CCB logs, learning a page."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import vowpalwabbit
from sqlalchemy import select
from vowpalwabbit.pyvw import CCBLabelType

from learners.ccb import CCBRanker, ccb_context
from service.storage.models import Joined
from tests.support.harness import AUTH, Harness

ACTIONS = [{"id": f"a{i}", "features": [{"kind": {"k": f"k{i}"}}]} for i in range(4)]
SLOTS = [
    {"id": "hero", "baselineAction": "a0", "features": [{"slot": {"pos": "hero"}}]},
    {"id": "side", "baselineAction": "a1", "features": [{"slot": {"pos": "side"}}]},
    {"id": "foot", "baselineAction": "a2", "features": [{"slot": {"pos": "foot"}}]},
]
BASE = "/loops/page/personalizer/v1.1-preview.1/multislot"


def make_page(harness: Harness, **config: Any) -> None:
    assert harness.client.put("/loops/page", json={"kind": "ccb"}, headers=AUTH).status_code == 201
    cfg = harness.client.get(
        "/loops/page/personalizer/v1.0/configurations/service", headers=AUTH
    ).json()
    cfg.update(modelExportFrequency="PT1S", rewardWaitTime="PT5S", **config)
    r = harness.client.put(
        "/loops/page/personalizer/v1.0/configurations/service", json=cfg, headers=AUTH
    )
    assert r.status_code == 200, r.text


def rank(harness: Harness, body: dict[str, Any]) -> Any:
    return harness.client.post(f"{BASE}/rank", json=body, headers=AUTH)


def page(event_id: str, user: str = "u0", **kw: Any) -> dict[str, Any]:
    body = {
        "contextFeatures": [{"user": {"u": user}}],
        "actions": ACTIONS,
        "slots": SLOTS,
        "eventId": event_id,
    }
    body.update(kw)
    return body


def test_multislot_rank_reward_and_the_logged_ccb_line(harness: Harness) -> None:
    make_page(harness)
    r = rank(harness, page("p1"))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert [s["id"] for s in doc["slots"]] == ["hero", "side", "foot"]
    chosen = [s["rewardActionId"] for s in doc["slots"]]
    assert len(set(chosen)) == 3  # an action fills at most one slot
    # Uniform before a model: 1/4 for the first slot, then 1/3, then 1/2.
    assert [s["probability"] for s in doc["slots"]] == pytest.approx([1 / 4, 1 / 3, 1 / 2])
    assert rank(harness, page("p1")).content == r.content  # a retry gets the same answer
    # Rewards per slot, in two calls; the footer never gets one (default reward).
    for body in (
        {"reward": [{"slotId": "hero", "value": 1}]},
        {"reward": [{"slotId": "side", "value": 0.5}]},
    ):
        assert (
            harness.client.post(f"{BASE}/events/p1/reward", json=body, headers=AUTH).status_code
            == 204
        )
    harness.clock.advance(6)
    harness.work()
    with harness.dloop.sessions() as s:
        line = s.scalars(select(Joined.line).where(Joined.event_id == "p1")).one()
    logged = orjson.loads(line)
    outcomes = {o["_id"]: o for o in logged["_outcomes"]}
    assert [outcomes[k]["_label_cost"] for k in ("hero", "side", "foot")] == [-1.0, -0.5, 0.0]
    ids = [a["_tag"] for a in logged["c"]["_multi"]]
    assert [ids[outcomes[s["id"]]["_a"][0]] for s in doc["slots"]] == chosen
    assert logged["_ba"] == [0, 1, 2]
    # VW reads the line as a 3-slot CCB example with one label per slot, on the chosen action.
    ws = vowpalwabbit.Workspace("--ccb_explore_adf --dsjson --quiet")
    examples = ws.parse(line)
    labels = [ex.get_label() for ex in examples]
    slot_labels = [lab for lab in labels if lab.type == CCBLabelType.SLOT]
    assert len(slot_labels) == 3
    assert [lab.outcome.action_probs[0].action for lab in slot_labels] == [
        ids.index(a) for a in chosen
    ]
    assert [lab.outcome.cost for lab in slot_labels] == [-1.0, -0.5, 0.0]
    ws.finish_example(examples)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"slots": []}, "InvalidRankRequest"),
        ({"slots": [{"id": "x", "baselineAction": "nope"}]}, "InvalidRankRequest"),
        (
            {"slots": [{"id": "x", "baselineAction": "a0"}, {"id": "x", "baselineAction": "a1"}]},
            "InvalidRankRequest",
        ),
        (
            {"slots": [{"id": "x", "baselineAction": "a0"}, {"id": "y", "baselineAction": "a0"}]},
            "InvalidRankRequest",
        ),
        (
            {"slots": [{"id": "x", "baselineAction": "a0", "excludedActions": ["a0"]}]},
            "InvalidRankRequest",
        ),
        (
            {"slots": [{"id": "x", "baselineAction": "a0", "excludedActions": ["zz"]}]},
            "InvalidRankRequest",
        ),
        (
            {"slots": [{"id": f"s{i}", "baselineAction": f"a{i % 4}"} for i in range(5)]},
            "InvalidRankRequest",
        ),
        (
            {"slots": [{"id": "x", "baselineAction": "a0", "features": [{"f": ["s"]}]}]},
            "InvalidRankRequest",
        ),
        ({"actions": []}, "InvalidRankRequest"),
        ({"episodeId": "ep1"}, "InvalidRankRequest"),  # (was taken, and ignored)
    ],
)
def test_bad_multislot_requests(harness: Harness, change: dict[str, Any], code: str) -> None:
    make_page(harness)
    r = rank(harness, page("bad", **change))
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_multislot_needs_a_ccb_loop_and_bad_rewards_are_400(harness: Harness) -> None:
    r = harness.client.post(
        "/personalizer/v1.1-preview.1/multislot/rank", json=page("x"), headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidMultiSlotApiAccess"
    make_page(harness)
    single = harness.client.post(
        "/loops/page/personalizer/v1.0/rank",
        json={"actions": ACTIONS, "contextFeatures": [{"a": 1}]},
        headers=AUTH,
    )
    assert single.status_code == 400
    for body in ({"reward": [{"slotId": "hero", "value": 2}]}, {"reward": []}, {"value": 1}):
        r = harness.client.post(f"{BASE}/events/p/reward", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRewardRequest"


def click(user: int, slot: int, action: int) -> float:
    """Slot-dependent click rates: the hero slot gets most attention; each user type likes
    different actions."""
    likes = [[0.5, 0.3, 0.1, 0.0], [0.0, 0.1, 0.3, 0.5]][user]
    attention = [0.6, 0.35, 0.15][slot]
    return 0.02 + attention * likes[action]


def slate_value(user: int, slate: tuple[int, ...]) -> float:
    return sum(click(user, k, a) for k, a in enumerate(slate))


@pytest.mark.slow
def test_the_learned_slate_beats_baselines_and_random(harness: Harness) -> None:
    make_page(harness)
    rng = np.random.default_rng(4)
    for i in range(3000):
        user = int(rng.integers(2))
        doc = rank(harness, page(f"e{i}", user=f"u{user}")).json()
        rewards = []
        for k, slot in enumerate(doc["slots"]):
            a = int(slot["rewardActionId"][1:])
            rewards.append({"slotId": slot["id"], "value": float(rng.random() < click(user, k, a))})
        harness.client.post(f"{BASE}/events/e{i}/reward", json={"reward": rewards}, headers=AUTH)
        if i % 100 == 99:
            harness.clock.advance(2)
            harness.work()
    harness.clock.advance(10)
    harness.work()
    model_bytes = harness.client.get("/loops/page/personalizer/v1.0/model", headers=AUTH).content
    ranker = CCBRanker(model_bytes)
    learned, baseline, rand, best = [], [], [], []
    perms = list(itertools.permutations(range(4), 3))
    for user in range(2):
        # The model's greedy slate, expected clicks known in closed form.
        c = ccb_context(
            [{"user": {"u": f"u{user}"}}],
            [(a["id"], a["features"]) for a in ACTIONS],
            [(s["id"], s["features"], list(range(4))) for s in SLOTS],
        )
        taken: list[int] = []
        for slot in c["_slots"]:
            free = [a for a in range(4) if a not in taken]
            pmf = ranker.slot_pmf(c, slot, free)
            taken.append(free[int(np.argmax(pmf))])
        learned.append(slate_value(user, tuple(taken)))
        baseline.append(slate_value(user, (0, 1, 2)))
        rand.append(np.mean([slate_value(user, p) for p in perms]))
        best.append(max(slate_value(user, p) for p in perms))
    progress = (np.mean(learned) - np.mean(rand)) / (np.mean(best) - np.mean(rand))
    # Measured: the best slate for both users (progress 1.0; baselines 0.31, random 0.31).
    assert progress > 0.8, (learned, best)
    assert np.mean(learned) > np.mean(baseline) + 0.1
    # The served ranking uses that model: each user's favourite lands in the hero slot far
    # more often than a uniform draw's one time in four.
    for user, favourite in ((0, "a0"), (1, "a3")):
        heroes = [
            rank(harness, page(f"after-{user}-{i}", user=f"u{user}")).json()["slots"][0]
            for i in range(40)
        ]
        hits = sum(h["rewardActionId"] == favourite for h in heroes)
        assert hits >= 30, (user, hits)  # measured: 40 and 39 of 40
        assert max(h["probability"] for h in heroes) > 0.9

    # Offline evaluation covers every slot; the hero slot's baseline and random values are
    # known exactly (every action is free for the first slot).
    from datetime import UTC, datetime, timedelta

    t = datetime.fromtimestamp(harness.clock(), UTC)
    body = {
        "name": "page",
        "startTime": (t - timedelta(days=1)).isoformat(),
        "endTime": (t + timedelta(days=1)).isoformat(),
        "policies": [{"name": "eps", "arguments": "--ccb_explore_adf --epsilon 0.1 -q ::"}],
    }
    evals = "/loops/page/personalizer/v1.0/evaluations"
    assert harness.client.put(f"{evals}/ev", json=body, headers=AUTH).status_code == 200
    harness.dloop.jobs._pool.shutdown(wait=True)
    doc = harness.client.get(f"{evals}/ev", headers=AUTH).json()
    assert doc["status"] == "Succeeded", doc
    by = {(v["slotId"], v["policySource"]): v["summary"] for v in doc["content"]["value"]}
    assert {slot for slot, _ in by} == {"hero", "side", "foot"}
    assert {src for _, src in by} == {"Online", "Baseline", "Random", "Custom"}
    truth = {
        "Baseline": np.mean([click(u, 0, 0) for u in range(2)]),
        "Random": np.mean([click(u, 0, a) for u in range(2) for a in range(4)]),
    }
    for source, value in truth.items():
        lo, hi = by[("hero", source)]["confidenceInterval"]
        assert lo <= value <= hi, (source, value, by[("hero", source)])


def test_exported_ccb_logs_parse_in_vw_with_counts_and_labels_matching(
    harness: Harness, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    make_page(harness)
    sent: dict[str, dict[str, float]] = {}
    for i in range(40):
        doc = rank(harness, page(f"x{i}", deferActivation=i % 10 == 0)).json()
        rewards = {s["id"]: round((i % 5) / 5, 2) for s in doc["slots"][: 1 + i % 3]}
        body = {"reward": [{"slotId": k, "value": v} for k, v in rewards.items()]}
        harness.client.post(f"{BASE}/events/x{i}/reward", json=body, headers=AUTH)
        sent[f"x{i}"] = rewards
    harness.clock.advance(6)
    harness.work()
    out = tmp_path / "ccb.json"
    data_dir = harness.dloop.settings.data_dir
    result = CliRunner().invoke(
        app, ["logs", "export", "--loop", "page", "--data-dir", str(data_dir), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 40
    ws = vowpalwabbit.Workspace("--ccb_explore_adf --dsjson --quiet")
    skipped = 0
    for text in lines:
        doc = orjson.loads(text)
        if doc.get("_skipLearn"):
            skipped += 1
        examples = ws.parse(text)
        costs = [
            ex.get_label().outcome.cost
            for ex in examples
            if ex.get_label().type == CCBLabelType.SLOT
        ]
        expected = [-sent[doc["EventId"]].get(s["id"], 0.0) for s in SLOTS]
        assert [o["_label_cost"] for o in doc["_outcomes"]] == expected
        # VW learns every labelled slot of a learnable line and skips the rest whole.
        assert costs == pytest.approx([] if doc.get("_skipLearn") else expected), doc["EventId"]
        ws.finish_example(examples)
    assert skipped == 4  # deferred and never activated
    # Replay retrains a multi-slot model from the exported lines alone, every slot included.
    model = tmp_path / "replayed.vw"
    result = CliRunner().invoke(
        app,
        [
            "replay",
            "--loop",
            "page",
            "--data-dir",
            str(data_dir),
            "--source",
            str(out),
            "--out",
            str(model),
        ],
    )
    assert result.exit_code == 0, result.output
    from learners import vw

    vw.check_model(model.read_bytes(), kind="ccb")
    ranker = CCBRanker(model.read_bytes())
    c = ccb_context(
        [{"user": {"u": "u0"}}],
        [(a["id"], a["features"]) for a in ACTIONS],
        [(s["id"], s["features"], list(range(4))) for s in SLOTS],
    )
    assert len(ranker.rank(c, [list(range(4))] * 3, "seed")) == 3
    # Feature importance reads multi-slot logs slot by slot (slot features included).
    result = CliRunner().invoke(
        app, ["features", "--source", str(out), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "slot.pos" in result.output
    # Custom multi-slot policies evaluate on every slot; a single-slot one is refused for the loop.
    cli = ["evaluate", "--loop", "page", "--data-dir", str(data_dir), "--source", str(out)]
    result = CliRunner().invoke(app, [*cli, "--policy", "sq=--ccb_explore_adf --squarecb"])
    assert result.exit_code == 0, result.output
    assert [s["id"] in result.output for s in SLOTS] == [True] * 3
    assert result.output.count("sq ") == 3
    result = CliRunner().invoke(app, [*cli, "--policy", "cb=--cb_explore_adf"])
    assert result.exit_code == 2 and "--ccb_explore_adf" in result.output


def test_apprentice_serves_each_slots_baseline_and_learns_to_imitate(harness: Harness) -> None:
    make_page(harness)
    cfg = harness.client.get(
        "/loops/page/personalizer/v1.0/configurations/service", headers=AUTH
    ).json()
    cfg["learningMode"] = "Apprentice"
    r = harness.client.put(
        "/loops/page/personalizer/v1.0/configurations/service", json=cfg, headers=AUTH
    )
    assert r.status_code == 200, r.text
    for i in range(20):
        doc = rank(harness, page(f"ap{i}")).json()
        assert [s["rewardActionId"] for s in doc["slots"]] == ["a0", "a1", "a2"]
        assert all(s["probability"] == 1.0 for s in doc["slots"])
        body = {"reward": [{"slotId": "hero", "value": 0.3}]}
        harness.client.post(f"{BASE}/events/ap{i}/reward", json=body, headers=AUTH)
    harness.clock.advance(6)
    harness.work()
    with harness.dloop.sessions() as s:
        lines = [orjson.loads(line) for line in s.scalars(select(Joined.line))]
    assert len(lines) == 20
    for doc in lines:
        for k, outcome in enumerate(doc["_outcomes"]):
            copied = outcome["_a"][0] == doc["_ba"][k]  # the model's own (logged) choice
            assert outcome["_label_cost"] == (-1.0 if copied else 0.0)
        assert doc["_outcomes"][0]["_original_label_cost"] == -0.3


def test_auto_optimization_is_refused_for_multi_slot(harness: Harness) -> None:
    make_page(harness)
    cfg = harness.client.get(
        "/loops/page/personalizer/v1.0/configurations/service", headers=AUTH
    ).json()
    cfg["isAutoOptimizationEnabled"] = True
    r = harness.client.put(
        "/loops/page/personalizer/v1.0/configurations/service", json=cfg, headers=AUTH
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "ProblemTypeIncompatibleWithAutoOptimization"
