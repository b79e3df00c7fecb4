"""RL targets (learners.rl): discounted returns, learned as costs with probability 1."""

from __future__ import annotations

import orjson
import pytest

from learners import vw
from learners.policy import PolicyError, header_options
from learners.rl import TABULAR_RL_POLICY, RLTrainer, Step, recalled, relabel, resolve
from learners.vw import check_policy


def test_targets_are_discounted_returns() -> None:
    """Terminated: the last target is its reward; earlier ones discount the later rewards."""
    trainer = RLTrainer(TABULAR_RL_POLICY, gamma=0.5, lam=1.0, replay=0, bonus=0)
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
        " --ignore_linear ais --noconstant"
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
    # ... and so do the linear terms it ignores: learning on, an unseen state is still blank.
    # (VW saved `--ignore_linear \x61 --ignore_linear \x69` as the characters "169\x", so a
    # reopened trainer learned every action's own weight, in every state at once.)
    for _ in range(10):
        again.learn_episode([Step(_line("1", 0, -1.0), -1.0)], terminated=True)
    assert [-c for c in vw.predict_scores(again.ws, _line("2", 0, 0.0))] == [0.0, 0.0, 0.0]
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


def test_a_random_outcome_is_averaged_over_what_the_recent_episodes_saw() -> None:
    """Action x in state 0 paid 1 in one recent episode and 0 in two (a slippery world): its
    one-step target is their average, 1/3, whichever one the step being learned saw, where the
    sampled target would swing between 1 and 0 (FrozenLake's start-state values did)."""
    trainer = RLTrainer(CROSSED, replay=0, window=3, memory=0, bonus=0)
    for reward in (1.0, 0.0, 0.0):
        trainer.learn_episode([Step(_line("0", 0, reward), reward)], terminated=True)
    assert trainer.returns([Step(_line("0", 0, 1.0), 1.0)], True) == pytest.approx([1 / 3])
    assert trainer.returns([Step(_line("0", 0, 0.0), 0.0)], True) == pytest.approx([1 / 3])
    # Without memory beyond the replayed window, only its episodes count: the 1 falls out.
    trainer.learn_episode([Step(_line("0", 0, 0.0), 0.0)], terminated=True)
    assert list(trainer.outcomes.seen.values()) == [{(0.0, None): 3}]
    # Another action of the same state has outcomes of its own (one so far: the sampled one).
    assert trainer.returns([Step(_line("0", 1, 0.5), 0.5)], True) == pytest.approx([0.5])
    sampled = RLTrainer(CROSSED, replay=0, window=3, expected=False)
    for reward in (1.0, 0.0, 0.0):
        sampled.learn_episode([Step(_line("0", 0, reward), reward)], terminated=True)
    assert sampled.returns([Step(_line("0", 0, 1.0), 1.0)], True) == pytest.approx([1.0])
    trainer.close()
    sampled.close()


def test_outcomes_are_counted_over_as_many_past_steps_as_memory_holds() -> None:
    """The replayed window holds 2 episodes, memory 3 steps: outcomes of one-step episodes
    are counted over the last 3 (the window's and one more), then the oldest leaves; a longer
    episode takes the place of several short ones, but the window's are always counted.
    (FrozenLake's rarely reached squares near the goal need every visit the last 300 episodes
    made: learners.rl.)"""
    trainer = RLTrainer(CROSSED, replay=0, window=2, memory=3, bonus=0)
    for reward in (1.0, 0.0, 0.0):
        trainer.learn_episode([Step(_line("0", 0, reward), reward)], terminated=True)
    key = (Step(_line("0", 0, 0.0), 0.0).state, 0)
    assert trainer.outcomes.seen[key] == {(1.0, None): 1, (0.0, None): 2}
    assert trainer.returns([Step(_line("0", 0, 0.0), 0.0)], True) == pytest.approx([1 / 3])
    trainer.learn_episode([Step(_line("0", 0, 1.0), 1.0)], terminated=True)
    assert trainer.outcomes.seen[key] == {(1.0, None): 1, (0.0, None): 2}  # the first left
    # Two episodes of 3 steps: over memory, but the replayed window's are kept.
    long = [
        Step(_line("1", 0, 0.0), 0.0),
        Step(_line("1", 0, 0.0), 0.0),
        Step(_line("0", 0, 0.5), 0.5),
    ]
    trainer.learn_episode(long, terminated=True)
    trainer.learn_episode(long, terminated=True)
    assert len(trainer.counted) == 2
    assert trainer.outcomes.seen[key] == {(0.5, None): 2}
    trainer.close()


def test_a_random_transition_is_averaged_over_the_states_it_led_to() -> None:
    """From state 0, x led to state 1 once and to state 2 once (each then ends with its own
    reward): the target of 0's step bootstraps from the average of V(1) and V(2), the value of
    a state not in the episode being learned read off the model by a line the window kept; a
    deterministic step keeps the lambda return."""
    trainer = RLTrainer(CROSSED, gamma=1.0, lam=1.0, replay=0, bonus=0)
    one = [Step(_line("0", 0, 0.0), 0.0), Step(_line("1", 0, 1.0), 1.0)]
    two = [Step(_line("0", 0, 0.0), 0.0), Step(_line("2", 0, -1.0), -1.0)]
    for _ in range(40):
        trainer.learn_episode(one, terminated=True)
        trainer.learn_episode(two, terminated=True)
    v1, v2 = trainer.value(one[1].line), trainer.value(two[1].line)
    assert v1 > 0.5 > v2
    first, last = trainer.returns(one, terminated=True)
    assert last == pytest.approx(1.0)  # one outcome: the sampled return
    assert first == pytest.approx((v1 + v2) / 2)
    trainer.close()


def test_an_action_rarely_tried_in_a_random_state_is_valued_optimistically() -> None:
    """In a state where an action led to more than one outcome (x in state 0: paid 1 once and
    0 twice), a step's target gains `bonus` / n, n the times the counted episodes tried its
    action there: x a third of the bonus, y, tried once, all of it. Nothing in a state whose
    actions each had one outcome (state 1, tried twice; state 9, seen once): a deterministic
    step is known once tried. FrozenLake's rarely reached squares next to the goal need it;
    CliffWalking and Taxi went round in loops with it (learners.rl)."""
    trainer = RLTrainer(CROSSED, replay=0, bonus=0.2)
    for state, chosen, reward in (
        *(("0", 0, r) for r in (1.0, 0.0, 0.0)),
        ("0", 1, 0.5),
        ("1", 0, 0.5),
        ("1", 0, 0.5),
        ("9", 0, 0.5),
    ):
        trainer.learn_episode([Step(_line(state, chosen, reward), reward)], terminated=True)
    for state, chosen, want in (
        ("0", 0, 1 / 3 + 0.2 / 3),
        ("0", 1, 0.5 + 0.2),
        ("1", 0, 0.5),
        ("9", 0, 0.5),
    ):
        target = trainer.returns([Step(_line(state, chosen, 0.5), 0.5)], True)
        assert target == pytest.approx([want]), (state, chosen)
    # State 0 turns deterministic again once x's other outcomes leave the counts.
    trainer.outcomes.remove([Step(_line("0", 0, 1.0), 1.0)], True)
    assert trainer.outcomes.random == {}
    assert trainer.returns([Step(_line("0", 1, 0.5), 0.5)], True) == pytest.approx([0.5])
    trainer.close()


def test_the_last_step_of_a_truncated_episode_is_no_outcome() -> None:
    """A time limit cut the episode after state 1's step: what it led to was never seen, so
    state 1 has no outcome (it used to count as leading back to itself, which made CliffWalking
    and Taxi's deterministic steps look random)."""
    trainer = RLTrainer(CROSSED, replay=0)
    steps = [Step(_line("0", 0, 0.0), 0.0), Step(_line("1", 0, 0.0), 0.0)]
    trainer.learn_episode(steps, terminated=False)
    assert trainer.outcomes.seen == {(steps[0].state, 0): {(0.0, steps[1].state): 1}}
    # State 0 now also leads to state 2: its target needs V(1), read off the line of a state
    # that was only ever the cut end of an episode.
    other = [steps[0], Step(_line("2", 0, 1.0), 1.0)]
    trainer.learn_episode(other, terminated=True)
    assert len(trainer.outcomes.seen[(steps[0].state, 0)]) == 2
    trainer.learn_episode(steps, terminated=True)
    assert trainer.outcomes.seen[(steps[1].state, 0)] == {(0.0, None): 1}
    trainer.close()


def test_a_reopened_trainer_given_back_its_episodes_replays_and_averages_as_before() -> None:
    """A trainer reopened from a saved model is given back the episodes it learned, as many as
    `recalled` says it kept (the window's 2 and earlier ones within 3 steps of memory): its
    replay window and outcome counts are the saved trainer's, so the next episode learns the
    same model whichever of the two learns it."""
    window, memory = 2, 3
    episodes = [([Step(_line("0", 0, r), r)], True) for r in (1.0, 0.0, 0.0, 1.0)] + [
        ([Step(_line("1", 1, 0.0), 0.0), Step(_line("0", 0, 0.5), 0.5)], True)
    ]
    kept = RLTrainer(CROSSED, replay=1, window=window, memory=memory, seed=3)
    for steps, ended in episodes:
        kept.learn_episode(steps, ended)
    sizes = [len(steps) for steps, _ in reversed(episodes)]
    n = recalled(sizes, window=window, memory=memory)
    assert n == 2 == len(kept.counted)  # 2 + 1 steps, and the next (1 step) would be over
    assert recalled([1, 1, 1, 1], window=2, memory=3) == 3
    assert recalled([5, 5, 1], window=2, memory=3) == 2  # the window's, whatever their steps
    reopened = RLTrainer(
        CROSSED, kept.to_bytes(), kept.examples, replay=1, window=window, memory=memory, seed=3
    )
    reopened.remember(episodes[-n:])
    assert reopened.outcomes.seen == kept.outcomes.seen
    assert [e for e, _ in reopened.recent] == [e for e, _ in kept.recent]
    blank = RLTrainer(
        CROSSED, kept.to_bytes(), kept.examples, replay=1, window=window, memory=memory, seed=3
    )  # without them: nothing to replay or average
    nxt = [Step(_line("0", 0, 0.0), 0.0)]
    for trainer in (kept, reopened, blank):
        trainer.learn_episode(nxt, True)
    for state in "01":  # the same replays: the same model
        line = _line(state, 0, 0.0)
        assert vw.predict_scores(reopened.ws, line) == vw.predict_scores(kept.ws, line)
    line = _line("0", 0, 0.0)
    assert blank.value(line) != pytest.approx(kept.value(line))
    for trainer in (kept, reopened, blank):
        trainer.close()
