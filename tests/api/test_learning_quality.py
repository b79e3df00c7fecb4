"""The served loop learns: on a simulated world with rewards up to 40 decisions late, dloop's
served policy clearly beats uniform random and comes within 10% of a hand-built VW loop."""

from __future__ import annotations

from typing import Any

import pytest

from learners.cb import DEFAULT_POLICY
from learners.policy import with_exploration
from learners.sim.reference import run_reference, run_served
from tests.support.harness import AUTH, Harness

N = 4000
SEED = 3
DECISIONS_PER_SECOND = 10  # simulated traffic: the fake clock moves 0.1 s per decision


@pytest.mark.slow
def test_served_policy_matches_a_hand_built_vw_loop(harness: Harness) -> None:
    harness.configure(modelExportFrequency="PT1S", rewardWaitTime="PT30S")

    def rank(body: dict[str, Any]) -> dict[str, Any]:
        return harness.rank(body)

    def tick(t: int) -> None:
        harness.clock.advance(1 / DECISIONS_PER_SECOND)
        if t % 5 == 0:
            harness.work()

    served = run_served(rank, harness.reward, tick, n=N, max_delay=40, seed=SEED)
    reference = run_reference(with_exploration(DEFAULT_POLICY, 0.2), n=N, max_delay=40, seed=SEED)

    got, uniform, oracle = served.tail()
    want = reference.tail()[0]
    print(f"served {got:.3f} reference {want:.3f} uniform {uniform:.3f} oracle {oracle:.3f}")
    assert served.progress() > 0.6, "served policy does not clearly beat uniform random"
    assert got >= 0.9 * want, f"served {got:.3f} is more than 10% below the reference {want:.3f}"

    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert 'dloop_observations_late{loop="default"}' not in metrics
