"""A simulated log whose policy values are known exactly: decisions of a logging policy on a
CBWorld, as exported DSJSON lines, with the true value of the Online, Baseline and Random
policies."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import numpy as np

from learners.features import cb_line, context_json
from learners.sim.worlds import CBWorld

N_ACTIONS = 5


TRAITS = (("country", 4), ("device", 3))


def logging_policy(expected: np.ndarray) -> np.ndarray:
    """Half the mass on the action the world ranks third, the rest uniform: neither good nor
    uniform, so every target policy is off-policy."""
    p = np.full(N_ACTIONS, 0.5 / N_ACTIONS)
    p[int(np.argsort(expected)[-3])] += 0.5
    return p


def simulated_log(n: int, seed: int = 3) -> tuple[list[str], dict[str, float]]:
    world = CBWorld(n_actions=N_ACTIONS, traits=TRAITS, seed=seed)
    rng = np.random.default_rng(seed)
    actions = [(f"a{i}", [{"kind": f"k{i}"}]) for i in range(N_ACTIONS)]
    lines = []
    t0 = 1_790_000_000.0
    for i in range(n):
        values, features = world.draw_context()
        expected = world.expected(values)
        p = logging_policy(expected)
        chosen = int(rng.choice(N_ACTIONS, p=p))
        reward = float(rng.random() < expected[chosen])
        order = [chosen] + [a for a in range(N_ACTIONS) if a != chosen]
        lines.append(
            cb_line(
                event_id=f"e{i}",
                timestamp=datetime.fromtimestamp(t0 + i, UTC).isoformat(),
                context=context_json(features, actions),
                ranking=order,
                probabilities=[float(p[a]) for a in order],
                model_id="m",
                cost=-reward,
                original_cost=-reward,
            ).decode()
        )
    # True values: contexts are uniform over every trait combination.
    combos = [
        world.expected(dict(zip([t for t, _ in TRAITS], v, strict=True)))
        for v in itertools.product(*(range(k) for _, k in TRAITS))
    ]
    truth = {
        "Online": float(np.mean([logging_policy(e) @ e for e in combos])),
        "Baseline": float(np.mean([e[0] for e in combos])),
        "Random": float(np.mean([e.mean() for e in combos])),
    }
    return lines, truth
