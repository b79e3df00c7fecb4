"""RL targets (learners.rl): discounted returns, learned as costs with probability 1."""

from __future__ import annotations

import orjson
import pytest

from learners import vw
from learners.policy import PolicyError, header_options
from learners.rl import TABULAR_RL_POLICY, RLTrainer, Step, relabel, resolve
from learners.vw import check_policy


def test_targets_are_discounted_returns() -> None:
    """Terminated: the last target is its reward; earlier ones discount the later rewards."""
    trainer = RLTrainer(TABULAR_RL_POLICY, gamma=0.5, lam=1.0, replay=0)
    line = relabel(
        orjson.dumps(
            {
                "_label_cost": 0,
                "_label_probability": 1,
                "_label_Action": 1,
                "_labelIndex": 0,
                "a": [1, 2],
                "p": [0.5, 0.5],
                "c": {"FromUrl": [{"state": {"s": "0"}}], "_multi": [{"i": {"id": "x"}}] * 2},
            }
        ).decode(),
        0.0,
    )
    steps = [Step(line, 0.0), Step(line, 0.0), Step(line, 1.0)]
    assert trainer.returns(steps, terminated=True) == pytest.approx([0.25, 0.5, 1.0])
    # Learned lines carry the return as cost with probability 1 (no importance weight).
    doc = orjson.loads(relabel(line, -0.25))
    assert doc["_label_cost"] == -0.25 and doc["_label_probability"] == 1.0
    assert list(doc)[:4] == ["_label_cost", "_label_probability", "_label_Action", "_labelIndex"]


CROSSED = "--cb_adf --cb_type mtr --cross_state_action --power_t 0 -l 0.5"


def _line(state: str, chosen: int, reward: float) -> str:
    """A joined line: a one-hot state, three actions with their own features."""
    actions = [
        {"_tag": a, "i": {"constant": 1, "id": a}, "j": [{"action": {"a": a}}]} for a in "xyz"
    ]
    return orjson.dumps(
        {
            "_label_cost": -reward,
            "_label_probability": 1,
            "_label_Action": chosen + 1,
            "_labelIndex": chosen,
            "a": [chosen + 1],
            "p": [1.0],
            "c": {"FromUrl": [{"state": {"s": state}}], "_multi": actions},
        }
    ).decode()


def test_the_cross_is_resolved_from_the_namespaces_an_episode_shows() -> None:
    s, i, a, j = (rf"\x{ord(c):02x}" for c in "siaj")
    assert resolve(CROSSED, {ord("s")}, {ord("i"), ord("a")}) == (
        f"--cb_adf --cb_type mtr --power_t 0 -l 0.5 -q {s}{a} -q {s}{i}"
        f" --ignore_linear {a} --ignore_linear {i} --ignore_linear {s} --noconstant"
    )
    # A namespace named with ':' would be VW's wildcard: left out.
    assert resolve(CROSSED, {ord("s"), ord(":")}, {ord("i"), ord("a")}) == resolve(
        CROSSED, {ord("s")}, {ord("i"), ord("a")}
    )
    # No state features: nothing to cross, the actions keep their own terms.
    assert resolve(CROSSED, set(), {ord("i")}) == "--cb_adf --cb_type mtr --power_t 0 -l 0.5"
    assert resolve(TABULAR_RL_POLICY, {1}, {2}) == TABULAR_RL_POLICY
    trainer = RLTrainer(CROSSED, replay=0)
    trainer.learn_episode([Step(_line("0", 0, 1.0), 1.0)], terminated=True)
    header = header_options(trainer.to_bytes())
    assert f"--quadratic {s}{a}" in header and f"--quadratic {s}{i}" in header, header
    assert "--noconstant" in header and j not in header
    trainer.close()


def test_with_the_cross_nothing_an_action_is_worth_carries_to_another_state() -> None:
    """The failure it fixes: on CliffWalking one state's -100 for "right" made right look bad
    in every state. Here action x pays in state 0 and costs in state 1; y is 0 everywhere."""
    trainer = RLTrainer(CROSSED, gamma=0.0, replay=0)
    for _ in range(30):
        trainer.learn_episode([Step(_line("0", 0, 1.0), 1.0)], terminated=True)
        trainer.learn_episode([Step(_line("1", 0, -1.0), -1.0)], terminated=True)
        trainer.learn_episode([Step(_line("1", 1, 0.0), 0.0)], terminated=True)
    q = {s: [-c for c in vw.predict_scores(trainer.ws, _line(s, 0, 0.0))] for s in "012"}
    assert q["0"][0] == pytest.approx(1.0, abs=0.05) and q["1"][0] == pytest.approx(-1.0, abs=0.05)
    assert q["1"][1] == pytest.approx(0.0, abs=0.05)
    # A state never seen: every action is still worth exactly what a blank model says.
    assert q["2"] == [0.0, 0.0, 0.0]
    # Saved and reopened (the learner's checkpoint), the interactions come along.
    model = trainer.to_bytes()
    again = RLTrainer(CROSSED, model, trainer.examples)
    assert [-c for c in vw.predict_scores(again.ws, _line("1", 0, 0.0))] == q["1"]
    trainer.close()
    again.close()


def test_a_blank_model_of_the_unresolved_policy_does_not_pin_its_interactions() -> None:
    """A loop's first model is a blank one of its policy (no episode yet, so no namespaces):
    a trainer opened on it resolves the cross from its first episode all the same."""
    blank = RLTrainer(CROSSED)
    model = blank.to_bytes()
    blank.close()
    assert "--quadratic" not in header_options(model)
    trainer = RLTrainer(CROSSED, model, 0)
    trainer.learn_episode([Step(_line("0", 0, 1.0), 1.0)], terminated=True)
    assert "--quadratic" in header_options(trainer.to_bytes())
    trainer.close()


def test_the_cross_is_for_rl_loops_only() -> None:
    check_policy(CROSSED, algorithm="--cb_adf")
    with pytest.raises(PolicyError, match="RL loops only"):
        check_policy("--cb_explore_adf --cross_state_action", algorithm="--cb_explore_adf")
    with pytest.raises(PolicyError, match="takes no value"):
        check_policy("--cb_adf --cross_state_action=1", algorithm="--cb_adf")
