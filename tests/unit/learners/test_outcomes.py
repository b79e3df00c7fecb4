"""learners.outcomes: named outcomes aggregated each by its own rule, the training reward a
definition makes of them, values checked against their ranges, joined lines that VW's --dsjson
parser learns exactly as before, and relabelling a line under another definition."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from learners import vw
from learners.ccb import ccb_line
from learners.features import cb_line
from learners.joiner import DecisionView, JoinRules, Obs, SlotDecision, is_complete, join
from learners.outcomes import (
    REWARD,
    OutcomeError,
    OutcomeRule,
    RewardRules,
    outcomes_of,
    relabel,
)
from learners.reward import parse

OUTCOMES = {
    REWARD: OutcomeRule(REWARD, "earliest", -1, 1),
    "click": OutcomeRule("click", "max", 0, 1),
    "purchase": OutcomeRule("purchase", "sum", 0, 1000),
    # No default: a definition reading it without coalesce needs it to have arrived.
    "unsubscribe": OutcomeRule("unsubscribe", "earliest", 0, 1, None),
}
RANGES = {n: (r.low, r.high) for n, r in OUTCOMES.items()}


def rules(
    text: str | None = "min(1, click + purchase / 50) - unsubscribe", **kw: Any
) -> RewardRules:
    definition = parse(text, known=RANGES, ranges=RANGES) if text else None
    return RewardRules(kw.pop("default", 0.0), OUTCOMES, definition, kw.pop("version", 1))


CONTEXT = orjson.dumps(
    {
        "FromUrl": [{"user": "u1"}],
        "_multi": [{"_tag": a, "i": {"constant": 1, "id": a}} for a in ("x", "y", "z")],
    }
)


def decision(**kw: Any) -> DecisionView:
    base: dict[str, Any] = dict(
        event_id="e1",
        created_at=1000.0,
        deferred=False,
        mode="Online",
        context=CONTEXT,
        ranking=[1, 0, 2],
        probabilities=[0.6, 0.2, 0.2],
        baseline=0,
        model_id="m",
    )
    base.update(kw)
    return DecisionView(**base)


def test_each_outcome_aggregates_by_its_own_rule() -> None:
    r = rules()
    values = [
        ("click", 0.0),
        ("purchase", 20.0),
        ("click", 1.0),
        ("purchase", 5.0),
        ("unsubscribe", 1),
        ("unsubscribe", 0),
    ]
    assert r.aggregate(values) == {"click": 1.0, "purchase": 25.0, "unsubscribe": 1.0}


def test_the_training_reward_is_the_definition_s_value_or_the_default() -> None:
    r = rules(default=-0.5)
    assert r.reward({"click": 1, "purchase": 0, "unsubscribe": 0}) == (1.0, True)
    assert r.reward({"click": 0, "purchase": 25, "unsubscribe": 1}) == (pytest.approx(-0.5), True)
    # An outcome it needs never arrived (no coalesce): the loop's default, counted as rewarded.
    assert r.reward({"click": 1}) == (-0.5, True)
    assert r.reward({}) == (-0.5, False)
    lenient = rules("1 - coalesce(unsubscribe, 0)")
    assert lenient.reward({}) == (1.0, False)  # a default for what never arrived
    # Declared defaults (0 unless said otherwise) stand in for what never arrived.
    assert rules("min(1, click + purchase / 50)").reward({"click": 1}) == (1.0, True)
    assert rules("clip(purchase / 50, 0, 1)").reward({"click": 1}) == (0.0, False)
    assert rules("clip(reward + click, -1, 1)", default=-0.25).reward({"click": 1}) == (0.75, True)
    # Without a definition the reward is Personalizer's `reward` outcome.
    plain = RewardRules.personalizer(0.25, "sum")
    assert plain.reward({"reward": 0.75, "click": 1}) == (0.75, True)
    assert plain.reward({"click": 1}) == (0.25, False)


def test_the_training_reward_never_leaves_the_reward_range() -> None:
    """Outcomes summed past their range (each value in it, the sum not), or sent under a wider
    range an admin has since narrowed: the training reward is clipped to [-1, 1] (it was 5.0
    and 8.0, learned as such and shown in the statistics)."""
    summed = RewardRules(
        0.0,
        {"click": OutcomeRule("click", "sum", 0.0, 1.0)},
        parse("click", ranges={"click": (0.0, 1.0)}),
    )
    assert summed.reward(summed.aggregate([("click", 1.0)] * 5)) == (1.0, True)
    assert summed.reward({"click": -8.0}) == (-1.0, True)
    plain = RewardRules.personalizer(0.0, "sum")
    assert plain.reward(plain.aggregate([("reward", 0.75)] * 3)) == (1.0, True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "non-empty object"),
        ([1], "non-empty object"),
        ({"Click": 1}, "outcome names are"),
        ({5: 1.0}, "outcome names must be strings: 5"),  # (only an in-process caller can)
        ({"views": 1}, "'views' is not configured"),
        ({"click": 2}, "between 0 and 1"),
        ({"purchase": -1}, "between 0 and 1000"),
        ({"click": math.nan}, "finite number"),
        ({"click": "1"}, "finite number"),
        ({"click": True}, "finite number"),
        ({"reward": 1.5}, "between -1 and 1"),
        ({f"o{i}": 0 for i in range(33)}, "at most 32"),
    ],
)
def test_bad_outcome_values_are_refused_with_the_reason(values: Any, message: str) -> None:
    with pytest.raises(OutcomeError, match=message):
        rules().check(values)


def test_good_outcome_values_pass_as_floats() -> None:
    assert rules().check({"click": 1, "purchase": 29.9, "reward": -1}) == {
        "click": 1.0,
        "purchase": 29.9,
        "reward": -1.0,
    }


def test_a_joined_line_keeps_raw_and_aggregated_outcomes_and_the_version() -> None:
    r = rules(version=3)
    obs = [
        Obs("reward", 0.0, 1001, name="click"),
        Obs("reward", 10.0, 1002, name="purchase"),
        Obs("reward", 1.0, 1003, name="click"),
        Obs("reward", 15.0, 1004, name="purchase"),
        Obs("reward", 0.5, 1005),  # Personalizer's reward, kept as it always was
    ]
    result = join(decision(), obs, JoinRules(60, 0.0, "earliest", r))
    doc = orjson.loads(result.line)
    # unsubscribe never arrived and the definition gives it no default: the loop's default.
    assert (result.reward, result.rewarded) == (0.0, True)
    assert doc["Outcomes"] == {"click": 1.0, "purchase": 25.0, "reward": 0.5}
    assert doc["RewardVersion"] == 3
    assert doc["o"][0] == {"v": 0.0, "Outcome": "click", "EventId": "e1", "ActionTaken": False}
    assert doc["o"][4] == {"v": 0.5, "EventId": "e1", "ActionTaken": False}
    assert doc["_label_cost"] == -result.reward
    assert list(doc).index("_label_cost") < list(doc).index("c")


def test_a_missing_outcome_without_a_default_gives_the_default_reward() -> None:
    r = rules(default=-0.1)
    obs = [Obs("reward", 1.0, 1001, name="click")]
    result = join(decision(), obs, JoinRules(60, -0.1, "earliest", r))
    assert (result.reward, result.rewarded) == (-0.1, True)
    complete = [
        *obs,
        Obs("reward", 0.0, 1002, name="purchase"),
        Obs("reward", 0, 1003, name="unsubscribe"),
    ]
    assert join(decision(), complete, JoinRules(60, -0.1, "earliest", r)).reward == 1.0


def test_plain_personalizer_lines_are_unchanged_by_named_outcomes() -> None:
    """A loop without outcomes or a definition writes exactly the line it always wrote."""
    obs = [Obs("reward", 0.5, 1001)]
    line = join(decision(), obs, JoinRules(60, 0.0, "earliest")).line
    expected = cb_line(
        event_id="e1",
        timestamp=orjson.loads(line)["Timestamp"],
        context=CONTEXT,
        ranking=[1, 0, 2],
        probabilities=[0.6, 0.2, 0.2],
        model_id="m",
        cost=-0.5,
        original_cost=-0.5,
        observations=[{"v": 0.5, "EventId": "e1", "ActionTaken": False}],
    )
    assert line == expected
    assert "Outcomes" not in orjson.loads(line)


def test_early_completion_waits_for_every_tracked_outcome() -> None:
    r = RewardRules(
        0.0,
        {
            **{n: OutcomeRule(n, "earliest", 0, 1) for n in ("click", "unsubscribe")},
            REWARD: OUTCOMES[REWARD],
        },
        parse("click - unsubscribe", ranges=RANGES),
        1,
    )
    join_rules = JoinRules(60, 0.0, "earliest", r)
    click = Obs("reward", 1.0, 1001, name="click")
    assert not is_complete(decision(), [click], join_rules)
    assert is_complete(
        decision(), [click, Obs("reward", 0.0, 1002, name="unsubscribe")], join_rules
    )
    # An outcome summed over the window can only be known at its end.
    summed = RewardRules(
        0.0, {**r.outcomes, "click": OutcomeRule("click", "sum", 0, 1)}, r.definition, 1
    )
    both = [click, Obs("reward", 0.0, 1002, name="unsubscribe")]
    assert not is_complete(decision(), both, JoinRules(60, 0.0, "earliest", summed))


def _learned(lines: list[bytes], args: str) -> bytes:
    ws = vw.workspace(f"{args} --dsjson", None)
    for line in lines:
        examples = ws.parse(line.decode())
        ws.learn(examples)
        ws.finish_example(examples)
    return vw.model_bytes(ws)


def test_vw_learns_the_same_model_from_lines_with_named_outcomes() -> None:
    """`Outcomes`, `RewardVersion` and named observations in `o` are keys VW's --dsjson parser
    ignores: the model is the same byte for byte as from the line without them."""
    r = rules(version=2)
    with_outcomes, without = [], []
    for i in range(50):
        obs = [
            Obs("reward", float(i % 2), 1001, name="click"),
            Obs("reward", 10.0 * (i % 3), 1002, name="purchase"),
            Obs("reward", 0.0, 1003, name="unsubscribe"),
        ]
        d = decision(event_id=f"e{i}", ranking=[i % 3, (i + 1) % 3, (i + 2) % 3])
        line = join(d, obs, JoinRules(60, 0.0, "earliest", r)).line
        with_outcomes.append(line)
        doc = orjson.loads(line)
        doc.pop("Outcomes"), doc.pop("RewardVersion")
        doc["o"] = [{k: v for k, v in o.items() if k != "Outcome"} for o in doc["o"]]
        without.append(orjson.dumps(doc))
    args = "--cb_explore_adf --epsilon 0.1 -q :: --random_seed 3"
    assert _learned(with_outcomes, args) == _learned(without, args)
    assert _learned(with_outcomes, args) != _learned(with_outcomes[:10], args)


def test_vw_reads_multi_slot_lines_with_outcomes_per_slot() -> None:
    r = rules(version=1)
    c = {
        **orjson.loads(CONTEXT),
        "_slots": [
            {"_id": "s1", "sj": [], "_inc": [0, 1, 2]},
            {"_id": "s2", "sj": [], "_inc": [0, 1, 2]},
        ],
    }
    slots = [
        SlotDecision("s1", [0, 1, 2], [0.8, 0.1, 0.1], 0),
        SlotDecision("s2", [1, 2], [0.5, 0.5], 1),
    ]
    obs = [
        Obs("reward", 1.0, 1001, "s1", "click"),
        Obs("reward", 50.0, 1002, "s2", "purchase"),
        Obs("reward", 0.0, 1003, "s2", "unsubscribe"),
    ]
    d = decision(context=orjson.dumps(c), slots=slots)
    result = join(d, obs, JoinRules(60, 0.0, "earliest", r))
    doc = orjson.loads(result.line)
    assert [s["Outcomes"] for s in doc["_outcomes"]] == [
        {"click": 1.0},
        {"purchase": 50.0, "unsubscribe": 0.0},
    ]
    assert result.outcomes == ({"click": 1.0}, {"purchase": 50.0, "unsubscribe": 0.0})
    # s1 lacks unsubscribe (no default): the default reward, 0; s2: min(1, 0 + 50 / 50) - 0.
    assert [s["_label_cost"] for s in doc["_outcomes"]] == [0.0, -1.0]
    ws = vw.workspace("--ccb_explore_adf --dsjson", None)
    examples = ws.parse(result.line.decode())
    assert len(examples) == 1 + 3 + 2  # shared, actions, slots
    ws.learn(examples)
    ws.finish_example(examples)


def test_relabel_recomputes_costs_from_the_outcomes() -> None:
    old = rules("clip(click, -1, 1)", version=1)
    obs = [
        Obs("reward", 1.0, 1001, name="click"),
        Obs("reward", 40.0, 1002, name="purchase"),
        Obs("reward", 1.0, 1003, name="unsubscribe"),
    ]
    line = join(decision(), obs, JoinRules(60, 0.0, "earliest", old)).line
    assert orjson.loads(line)["_label_cost"] == -1.0
    new = rules("clip(purchase / 50 - unsubscribe, -1, 1)", version=2)
    doc = orjson.loads(relabel(line, new))
    assert doc["_label_cost"] == doc["_original_label_cost"] == pytest.approx(-(0.8 - 1))
    assert doc["RewardVersion"] == 2
    assert list(doc).index("_label_cost") < list(doc).index("c")  # VW still reads the label
    # Apprentice lines learn imitation: only the observed reward changes.
    apprentice = orjson.loads(relabel(line, new, apprentice=True))
    assert apprentice["_label_cost"] == -1.0
    assert apprentice["_original_label_cost"] == pytest.approx(0.2)


def test_lines_from_before_named_outcomes_relabel_from_their_reward() -> None:
    line = join(decision(), [Obs("reward", 0.5, 1001)], JoinRules(60, 0.0, "earliest")).line
    assert outcomes_of(orjson.loads(line)) == {"reward": 0.5}
    unrewarded = join(decision(), [], JoinRules(60, -0.2, "earliest")).line
    assert outcomes_of(orjson.loads(unrewarded)) == {}
    doubled = rules("clip(2 * reward, -1, 1)", version=1)
    assert orjson.loads(relabel(line, doubled))["_label_cost"] == -1.0
    assert orjson.loads(relabel(unrewarded, doubled))["_label_cost"] == 0.0  # the default


def test_ccb_lines_relabel_per_slot() -> None:
    line = ccb_line(
        event_id="e",
        timestamp="2026-01-01T00:00:00Z",
        c={"_multi": [], "_slots": []},
        outcomes=[
            {
                "id": "s1",
                "a": [0],
                "p": [1.0],
                "cost": -1.0,
                "original": -1.0,
                "outcomes": {"click": 1.0},
            },
            {
                "id": "s2",
                "a": [1],
                "p": [1.0],
                "cost": 0.0,
                "original": 0.0,
                "outcomes": {"purchase": 50.0},
            },
        ],
        baselines=[0, 1],
        model_id="m",
        version=1,
    )
    doc = orjson.loads(relabel(line, rules("clip(coalesce(purchase, 0) / 50, 0, 1)", version=2)))
    assert [s["_label_cost"] for s in doc["_outcomes"]] == [0.0, -1.0]
