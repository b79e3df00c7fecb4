"""The RL learning-quality benchmark (benchmarks/rl.py), fast: its worlds' known optima, and three
worlds with fixed seeds through the same code as `make bench` (a live loop's code, in process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from benchmarks.rl import WORLDS, optimum_of, run_dloop, run_tabular, summarise, threshold_of
from learners.sim.envs import Inventory
from service.pipeline.simulate import make_env, mean_return


def test_the_inventory_optimum_is_what_its_policy_earns_by_playing_the_world() -> None:
    """The table `P` (value iteration's input) and `step` (what learners play) are one world:
    the optimal policy played for 2,000 episodes earns the table's optimum, and no fixed
    order-up-to rule does better."""
    env = Inventory()
    values = np.zeros(len(env.P))

    def q(s: int, a: int) -> float:
        return float(sum(p * (r + (0 if d else values[s2])) for p, s2, r, d in env.P[s][a]))

    for _ in range(env.DAYS + 1):  # finite horizon: exact after DAYS sweeps
        values = np.array([max(q(s, a) for a in range(4)) for s in range(len(env.P))])

    def best(obs: np.ndarray) -> int:
        return int(np.argmax([q(env.state_index(obs), a) for a in range(4)]))

    def play(policy: Callable[[np.ndarray], int], episodes: int = 2000) -> float:
        return mean_return(make_env("dloop/Inventory-v0", 15), policy, episodes, 0)

    start = env.state_index((0, env.START))
    assert abs(play(best) - values[start]) < 0.15
    for level in range(1, 6):
        rule = lambda obs, level=level: max(0, min(3, level - int(obs[1])))  # noqa: E731
        assert play(rule, 500) < values[start]
    # The benchmark's optimum is exact too (expected_return on the table), up to the near ties
    # value iteration's discount (0.99) settles differently from this undiscounted one.
    assert abs(optimum_of(WORLDS["Inventory"]) - values[start]) < 0.01


def test_dloop_generalises_where_a_table_cannot_and_learns_a_delayed_reward() -> None:
    """NoisyCorridor (no state seen twice): dloop's default rl policy walks it optimally within
    40 episodes on both seeds, tabular Q-learning never. DelayedKey (the reward 9 steps after
    the choice that earns it): dloop takes the key; Q-learning, one step back per visit, has not
    carried the reward back to the choice in 60 episodes."""
    for name, episodes in (("NoisyCorridor", 40), ("DelayedKey", 60)):
        world = replace(WORLDS[name], episodes=episodes)
        optimum = optimum_of(world)
        bar = threshold_of(world, optimum)
        dloop = summarise([run_dloop(world, seed) for seed in (0, 1)], optimum, bar)
        table = summarise([run_tabular(world, seed) for seed in (0, 1)], optimum, bar)
        assert min(dloop.final) >= bar, (name, dloop)
        assert max(table.final) < bar, (name, table)


def test_dloop_walks_the_cliff_edge_the_old_default_never_reached() -> None:
    """CliffWalking, where an action's penalty next to the cliff must not carry to other states
    (learners.rl: the state x action cross): the default walks the optimal edge path within 60
    episodes on both seeds (the `-q ::` default it replaced never reached the goal in 300).
    Seeds 1 and 2 walk it from episode 40 (at exploration 0.3; with the replay draws of
    2026-12-06 seed 0 walks the row above past episode 100, seeds 3 and 4 reach the edge by
    episode 80 and 100): the benchmark weighs all 10 seeds."""
    world = replace(WORLDS["CliffWalking"], episodes=60, eval_every=20)
    for seed in (1, 2):
        run = run_dloop(world, seed)
        assert run.greedy[60] == -13.0, run.greedy


def test_optimism_where_the_world_is_random_finds_frozenlake_s_best_path() -> None:
    """Slippery FrozenLake, two seeds that missed the bar without the learner's optimism for
    rarely tried actions in random states (learners.rl, `bonus`): seed 3 stayed at a greedy
    return of 0.43 from episode 90 to 300 ("right" next to the goal, the best action there,
    tried 4 times in 300 episodes), seed 5 at 0.60 from episode 160. With it both end on the
    optimal policy's 0.74 (the bar: 0.67)."""
    world = WORLDS["FrozenLake"]
    optimum = optimum_of(world)
    for seed in (3, 5):
        run = run_dloop(world, seed)
        assert run.greedy[300] >= threshold_of(world, optimum), (seed, run.greedy)
