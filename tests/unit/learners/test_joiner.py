"""Join rules (learners.joiner): window, aggregation, default reward, deferred activation,
apprentice labels."""

from __future__ import annotations

import orjson
import pytest

from learners.features import context_json
from learners.joiner import DecisionView, JoinRules, Obs, is_complete, join
from learners.outcomes import aggregate

T0 = 1_000_000.0


def decision(**kw: object) -> DecisionView:
    base: dict[str, object] = {
        "event_id": "e1",
        "created_at": T0,
        "deferred": False,
        "mode": "Online",
        "context": context_json([{"a": 1}], [("x", [{"f": 1}]), ("y", [{"f": 2}])]),
        "ranking": [1, 0],
        "probabilities": [0.9, 0.1],
        "baseline": 0,
        "model_id": "m1",
    }
    base.update(kw)
    return DecisionView(**base)  # type: ignore[arg-type]


RULES = JoinRules(wait=60.0, default_reward=0.0, aggregation="earliest")


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("earliest", 0.5),
        ("sum", 1.5),
        ("average", 0.5),
        ("min", -0.5),
        ("max", 1.5),
        ("median", 0.5),
    ],
)
def test_aggregations(how: str, expected: float) -> None:
    assert aggregate([0.5, -0.5, 1.5], how, 0.0) == pytest.approx(expected)


def test_no_reward_gives_default() -> None:
    assert aggregate([], "sum", -0.25) == -0.25
    result = join(decision(), [], JoinRules(60, -0.25, "sum"))
    line = orjson.loads(result.line)
    assert line["_label_cost"] == 0.25 and not result.rewarded


def test_rewards_outside_the_window_do_not_count() -> None:
    obs = [
        Obs("reward", 0.3, T0 - 121),  # too early (more than 2 minutes before)
        Obs("reward", 0.7, T0 + 10),
        Obs("reward", 0.9, T0 + 61),  # after the wait time
    ]
    result = join(decision(), obs, JoinRules(60, 0.0, "sum"))
    assert result.reward == pytest.approx(0.7)
    assert [o["v"] for o in orjson.loads(result.line)["o"]] == [0.7]


def test_earliest_takes_first_received_not_first_listed() -> None:
    obs = [Obs("reward", 0.2, T0 + 30), Obs("reward", 0.8, T0 + 5)]
    assert join(decision(), obs, RULES).reward == pytest.approx(0.8)


def test_orphan_reward_before_decision_counts_within_two_minutes() -> None:
    assert join(decision(), [Obs("reward", 1.0, T0 - 100)], RULES).reward == 1.0


@pytest.mark.parametrize(
    ("obs", "learnable", "reward"),
    [
        ([Obs("reward", 1.0, T0 + 1)], False, 1.0),  # never activated
        ([Obs("activate", None, T0 + 1), Obs("reward", 1.0, T0 + 2)], True, 1.0),
        ([Obs("activate", None, T0 + 1)], True, 0.0),  # activated, default reward
        ([Obs("activate", None, T0 + 90), Obs("reward", 1.0, T0 + 2)], False, 1.0),  # late
    ],
)
def test_deferred_activation(obs: list[Obs], learnable: bool, reward: float) -> None:
    result = join(decision(deferred=True), obs, RULES)
    line = orjson.loads(result.line)
    assert result.learnable is learnable
    assert line.get("_skipLearn", False) is (not learnable)
    assert result.reward == reward


def test_apprentice_learns_imitation_and_keeps_the_real_reward() -> None:
    matched = join(decision(mode="Apprentice", ranking=[0, 1]), [Obs("reward", 0.3, T0 + 1)], RULES)
    missed = join(decision(mode="Apprentice", ranking=[1, 0]), [Obs("reward", 0.3, T0 + 1)], RULES)
    assert orjson.loads(matched.line)["_label_cost"] == -1.0 and matched.imitated
    assert orjson.loads(missed.line)["_label_cost"] == 0.0 and not missed.imitated
    assert orjson.loads(missed.line)["_original_label_cost"] == -0.3


def test_label_fields_describe_the_chosen_action() -> None:
    line = orjson.loads(join(decision(), [Obs("reward", 1.0, T0 + 1)], RULES).line)
    assert line["_label_Action"] == 2 and line["_labelIndex"] == 1
    assert line["_label_probability"] == 0.9 and line["a"] == [2, 1] and line["p"] == [0.9, 0.1]
    assert line["VWState"] == {"m": "m1"} and line["EventId"] == "e1"


def test_earliest_completes_early_only_when_activation_is_in() -> None:
    reward = [Obs("reward", 1.0, T0 + 1)]
    assert is_complete(decision(), reward, RULES)
    assert not is_complete(decision(deferred=True), reward, RULES)
    assert is_complete(decision(deferred=True), [*reward, Obs("activate", None, T0 + 2)], RULES)
    assert not is_complete(decision(), reward, JoinRules(60, 0, "sum"))
    assert not is_complete(decision(), [Obs("reward", 1.0, T0 + 61)], RULES)
