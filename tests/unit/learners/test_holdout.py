"""Live holdout: assignment by key, the holdout policies, and the uplift statistics judged on a
simulated world whose true uplift is known exactly (coverage over 20 seeds, and the false-alarm
rate of the always-valid interval in an A/A setup watched after every 100 decisions)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from learners.holdout import (
    Moments,
    confidence_sequence,
    effect,
    holdout_pmf,
    in_holdout,
    uplift,
)
from learners.sampling import sample
from learners.sim.worlds import CBWorld

TRAITS = (("country", 4), ("device", 3))
N_ACTIONS = 5
SEEDS = range(20)


def test_assignment_is_sticky_and_takes_the_share() -> None:
    keys = [f"user-{i}" for i in range(20_000)]
    held = [k for k in keys if in_holdout("loop", k, 0.2)]
    assert abs(len(held) / len(keys) - 0.2) < 0.01
    assert all(in_holdout("loop", k, 0.2) for k in held[:100])  # the same key, the same side
    assert not any(in_holdout("loop", k, 0.0) for k in keys)
    # A larger share keeps everyone already held out (the hash is compared to the share).
    assert all(in_holdout("loop", k, 0.3) for k in held)
    # Loops draw independently.
    other = {k for k in keys if in_holdout("other", k, 0.2)}
    assert abs(len(other & set(held)) / len(keys) - 0.04) < 0.01


def test_holdout_policies() -> None:
    eligible = [False, True, True, False]
    assert holdout_pmf("baseline", eligible) == [0.0, 1.0, 0.0, 0.0]
    assert holdout_pmf("random", eligible) == [0.0, 0.5, 0.5, 0.0]


def test_moments_and_the_boundary_shrink() -> None:
    m = Moments()
    for x in (1.0, 2.0, 3.0, 4.0):
        m.add(x)
    assert (m.n, m.mean) == (4, 2.5)
    assert m.variance == pytest.approx(np.var([1, 2, 3, 4], ddof=1))
    widths = []
    rng = np.random.default_rng(0)
    m = Moments()
    for i in range(10_000):
        m.add(float(rng.random() < 0.3))
        if i + 1 in (100, 1_000, 10_000):
            widths.append(confidence_sequence(m))
    assert widths[0] > widths[1] > widths[2] > 0
    # Wider than the fixed-horizon interval (it holds at every n at once), not absurdly so.
    fixed = 1.96 * math.sqrt(m.variance / m.n)
    assert fixed < widths[2] < 3 * fixed


def _world(seed: int) -> tuple[CBWorld, list[np.ndarray]]:
    world = CBWorld(n_actions=N_ACTIONS, traits=TRAITS, seed=100 + seed)
    combos = [
        world.expected(dict(zip([t for t, _ in TRAITS], v, strict=True)))
        for v in itertools.product(*(range(k) for _, k in TRAITS))
    ]
    return world, combos


def _learning_policy(expected: np.ndarray, t: int) -> list[float]:
    """A policy that learns: uniform at first, then more and more on the best action, keeping
    10% exploration (known exactly at every step, so the true uplift is too)."""
    explore = max(0.1, 1 - t / 1500)
    p = np.full(N_ACTIONS, explore / N_ACTIONS)
    p[int(np.argmax(expected))] += 1 - explore
    return [float(x) for x in p]


def _run(
    seed: int,
    *,
    n: int,
    share: float,
    online: str,
    holdout_policy: str,
    every: int = 100,
) -> tuple[float, list[tuple[float, float, float]], tuple[float, float] | None]:
    """Simulated traffic. Returns the true uplift (the average over the decisions so far of
    each one's expected effect, over every context: the online policy changes as it learns),
    what was seen after every `every` decisions (the always-valid interval and the true uplift
    then), and the final fixed-horizon interval."""
    world, combos = _world(seed)
    rng = np.random.default_rng(seed)
    on, off, effects, everyone = Moments(), Moments(), Moments(), Moments()
    truth_sum = 0.0
    seen: list[tuple[float, float, float]] = []
    eligible = [True] * N_ACTIONS
    baseline_value = float(np.mean([e[0] for e in combos]))
    random_value = float(np.mean([e.mean() for e in combos]))
    held_value = baseline_value if holdout_policy == "baseline" else random_value
    result = None
    for t in range(n):
        if online == "learning":
            online_value = float(np.mean([np.dot(_learning_policy(e, t), e) for e in combos]))
        else:
            online_value = random_value
        truth_sum += online_value - held_value
        values, _ = world.draw_context()
        expected = world.expected(values)
        event_id = f"s{seed}-e{t}"
        held = in_holdout("loop", event_id, share)
        if held:
            pmf = holdout_pmf(holdout_policy, eligible)
        elif online == "learning":
            pmf = _learning_policy(expected, t)
        else:
            pmf = holdout_pmf("random", eligible)
        chosen = sample(pmf, f"loop/{event_id}")
        reward = float(rng.random() < expected[chosen])
        (off if held else on).add(reward)
        # Centred on the mean reward so far, as the joiner does.
        effects.add(effect(reward, held_out=held, share=share, center=everyone.mean))
        everyone.add(reward)
        if (t + 1) % every == 0 and (u := uplift(on, off, effects)) is not None:
            seen.append((*u.always_valid95, truth_sum / (t + 1)))
            result = u.interval95
    return truth_sum / n, seen, result


def test_intervals_cover_the_true_uplift_of_a_learning_policy() -> None:
    """The online policy learns (its value changes every step) and beats the baseline; both
    intervals must cover the true uplift in at least 90% of 20 seeds (the always-valid one at
    every look, not only at the end)."""
    fixed_covers = always_covers = 0
    truths, widths = [], []
    for seed in SEEDS:
        truth, seen, final = _run(
            seed, n=3000, share=0.2, online="learning", holdout_policy="baseline"
        )
        assert final is not None
        truths.append(truth)
        widths.append(final[1] - final[0])
        fixed_covers += final[0] <= truth <= final[1]
        always_covers += all(lo <= then <= hi for lo, hi, then in seen)
    print(
        f"coverage: fixed {fixed_covers}/20, always-valid {always_covers}/20; "
        f"true uplift {min(truths):.3f}..{max(truths):.3f}, fixed width {np.mean(widths):.3f}"
    )
    assert np.mean(truths) > 0.1  # the online policy beats the baseline, by a known amount
    assert fixed_covers >= 18, fixed_covers
    assert always_covers >= 18, always_covers


def test_always_valid_interval_rarely_flags_an_aa_test() -> None:
    """A/A: the holdout policy is worth exactly what the online one is. Watched after every 100
    decisions, the always-valid interval flags a difference in at most 5% of 20 seeds (the
    fixed-horizon interval, watched the same way, is what it guards against)."""
    flagged = 0
    for seed in SEEDS:
        truth, seen, _ = _run(seed, n=3000, share=0.2, online="random", holdout_policy="random")
        assert truth == 0
        flagged += any(not lo <= 0 <= hi for lo, hi, _ in seen)
    print(f"A/A: the always-valid interval flagged {flagged} of 20 seeds")
    assert flagged <= 1, flagged
