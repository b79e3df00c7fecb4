"""`dloop simulate`: drive a gymnasium environment through dloop's HTTP API and plot how it learns.

Each episode is one dloop episode: every step ranks the environment's actions with the
observation as context (`learners.envs.observation_features`), takes the chosen action, and
rewards that event with the step's reward divided by `reward_scale` (dloop accepts rewards in
[-1, 1]); the episode is ended as terminated or truncated. Returns are reported in the
environment's own units.

Every `eval_every` episodes (and at the end) the loop's current model is downloaded through the
API and its greedy policy evaluated locally, so the greedy return is measured without adding
evaluation episodes to the loop's logs: exactly from the world's transition table where it has
one (the toy-text worlds, dloop/Inventory-v0), else played on fixed seeds.
"""

from __future__ import annotations

import csv
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from learners.cb import CBRanker
from learners.features import context_json
from learners.rl import RLRanker
from learners.sim import envs
from learners.tiles import TileCoding
from service.client import Client
from service.core.kinds import RL, loop_kind

# Largest |reward| of environments whose rewards leave [-1, 1].
# The first seed of the fixed evaluation episodes greedy returns are measured on.
EVAL_SEED = 10_000
REWARD_SCALES = {"CliffWalking": 100.0, "Taxi": 20.0, "Inventory": 3.0}


def reward_scale_for(env_id: str) -> float:
    return next((v for k, v in REWARD_SCALES.items() if k in env_id), 1.0)


@dataclass
class Curve:
    env_id: str
    returns: list[float] = field(default_factory=list)
    greedy: dict[int, float] = field(default_factory=dict)  # episodes done -> mean greedy return
    optimal: float | None = None  # the optimal policy's greedy return, where it is known

    def moving_average(self, window: int = 20) -> list[float]:
        out, total = [], 0.0
        for i, r in enumerate(self.returns):
            total += r
            if i >= window:
                total -= self.returns[i - window]
            out.append(total / min(i + 1, window))
        return out

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["episode", "return", "moving_average", "greedy_return"])
            for i, (r, m) in enumerate(zip(self.returns, self.moving_average(), strict=True)):
                g = self.greedy.get(i + 1)
                w.writerow([i + 1, r, f"{m:.4f}", "" if g is None else f"{g:.4f}"])

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        x = np.arange(1, len(self.returns) + 1)
        ax.plot(x, self.returns, color="#bbbbbb", linewidth=0.8, label="return (exploring)")
        ax.plot(x, self.moving_average(), color="#1f77b4", label="moving average (20)")
        if self.greedy:
            gx = sorted(self.greedy)
            ax.plot(gx, [self.greedy[i] for i in gx], "o-", color="#d62728", label="greedy return")
        if self.optimal is not None:
            ax.axhline(self.optimal, color="#2ca02c", linestyle="--", label="optimal")
        # The first, exploring episodes can be orders of magnitude worse than the rest: keep the
        # scale on what the learner reaches (the clipped start is still drawn to the edge).
        low = float(np.percentile(self.returns, 5))
        high = max([*self.returns, *self.greedy.values(), self.optimal or low])
        ax.set_ylim(low - 0.05 * (high - low + 1), high + 0.05 * (high - low + 1))
        ax.set_xlabel("episode")
        ax.set_ylabel("return")
        ax.set_title(f"dloop simulate: {self.env_id}")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def make_env(env_id: str, max_steps: int) -> gym.Env[Any, Any]:
    envs.register()
    return gym.make(env_id, max_episode_steps=max_steps)


def run(
    client: Client,
    env_id: str,
    episodes: int,
    *,
    seed: int = 0,
    max_steps: int = 200,
    reward_scale: float | None = None,
    eval_every: int = 0,
    eval_episodes: int = 10,
    kind: str = RL.name,
    after_episode: Callable[[int], None] | None = None,
    progress: bool = True,
    run_id: str | None = None,
    steps_per_second: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Curve:
    """Play `episodes` episodes through `client`; returns the learning curve. With
    `steps_per_second`, steps start at that pace (as users would come), not as fast as the
    server answers.

    Event ids are `<run_id>-<episode>-<step>`, and dloop seeds each draw from its event id, so
    a run with a fixed `run_id` and seed is repeatable (tests); by default `run_id` is random,
    so another run on the same loop does not collide with this one's events."""
    from tqdm import tqdm

    env = make_env(env_id, max_steps)
    scale = reward_scale or reward_scale_for(env_id)
    actions = envs.action_list(env.action_space)
    curve = Curve(env_id, optimal=optimal_return(env_id, max_steps, eval_episodes))
    run_id = run_id or uuid.uuid4().hex[:8]
    episodic = loop_kind(kind).episodic
    bar = tqdm(range(episodes), desc=env_id, unit="ep", disable=not progress)
    next_step = clock()
    for ep in bar:
        obs, _ = env.reset(seed=seed + ep)
        episode_id = f"{run_id}-{ep}"
        total, terminated = 0.0, False
        for step in itertools.count():
            if steps_per_second:  # behind (a slow answer, an evaluation): at most 1 s to catch up
                next_step = max(next_step + 1.0 / steps_per_second, clock() - 1.0)
                if (wait := next_step - clock()) > 0:
                    sleep(wait)
            ranked = client.rank(
                envs.observation_features(obs),
                actions,
                event_id=f"{episode_id}-{step}",
                episode_id=episode_id if episodic else None,
            )
            action = int(ranked["rewardActionId"])
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            client.reward(ranked["eventId"], float(np.clip(float(reward) / scale, -1, 1)))
            if terminated or truncated:
                break
        if episodic:
            client.end_episode(episode_id, terminated=terminated)
        curve.returns.append(total)
        if after_episode is not None:
            after_episode(ep)
        done = ep + 1
        if (eval_every and done % eval_every == 0) or done == episodes:
            curve.greedy[done] = greedy_return(
                client.model(), kind, env_id, max_steps, eval_episodes
            )
            bar.set_postfix(greedy=f"{curve.greedy[done]:.2f}")
    return curve


def optimal_return(
    env_id: str, max_steps: int, episodes: int, seed: int = EVAL_SEED, gamma: float = 0.99
) -> float | None:
    """The optimal policy's return, as greedy_return measures it, for environments with a
    known transition table (gymnasium's toy-text `P`: CliffWalking, Taxi, FrozenLake), by value
    iteration on discounted return; None for others. A world whose observation is not
    the table's state says how to find it (`state_index`, dloop/Inventory-v0's)."""
    env = make_env(env_id, max_steps)
    table = getattr(env.unwrapped, "P", None)
    if not isinstance(table, dict):
        return None
    n_states, n_actions = len(table), int(env.action_space.n)  # type: ignore[attr-defined]
    values = np.zeros(n_states)

    def q(state: int) -> np.ndarray:
        return np.array(
            [
                sum(p * (r + gamma * values[s2] * (not done)) for p, s2, r, done in table[state][a])
                for a in range(n_actions)
            ]
        )

    for _ in range(2000):
        new = np.array([q(s).max() for s in range(n_states)])
        if np.max(np.abs(new - values)) < 1e-9:
            break
        values = new
    index: Callable[[Any], int] = getattr(env.unwrapped, "state_index", int)
    return policy_return(env, lambda obs: int(np.argmax(q(index(obs)))), max_steps, episodes, seed)


def policy_return(
    env: gym.Env[Any, Any], act: Callable[[Any], int], max_steps: int, episodes: int, seed: int
) -> float:
    """The return of the policy `act` as greedy returns are measured: exact where the world
    has a transition table (expected_return), else its mean over `episodes` fixed seeds."""
    exact = expected_return(env, act, max_steps)
    return exact if exact is not None else mean_return(env, act, episodes, seed)


def expected_return(
    env: gym.Env[Any, Any], act: Callable[[Any], int], max_steps: int
) -> float | None:
    """The policy `act`'s expected return over `max_steps` steps, exact, for a world with a
    transition table and a start distribution (gymnasium's toy-text `P` and
    `initial_state_distrib`; a world whose observation is not the table's state gives
    `observation_of(state)`); None for others. No sampling noise: a difference between two
    policies' returns is theirs, not their evaluation episodes'."""
    world = env.unwrapped
    table = getattr(world, "P", None)
    start = getattr(world, "initial_state_distrib", None)
    if not isinstance(table, dict) or start is None:
        return None
    observe: Callable[[int], Any] = getattr(world, "observation_of", lambda s: s)
    n = len(table)
    gain, move = np.zeros(n), np.zeros((n, n))  # the policy's expected reward and transitions
    for state in range(n):
        for p, after, reward, done in table[state][act(observe(state))]:
            gain[state] += p * reward
            if not done:
                move[state, after] += p
    to_go = np.zeros(n)  # expected return of the steps left, by state
    for _ in range(max_steps):
        to_go = gain + move @ to_go
    return float(np.dot(np.asarray(start, dtype=float), to_go))


def mean_return(
    env: gym.Env[Any, Any], act: Callable[[Any], int], episodes: int, seed: int
) -> float:
    """Mean return of the policy `act` (observation -> action) over `episodes` fixed seeds."""
    totals = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total = 0.0
        while True:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            if terminated or truncated:
                break
        totals.append(total)
    return float(np.mean(totals))


def greedy_return(
    model: bytes,
    kind: str,
    env_id: str,
    max_steps: int,
    episodes: int,
    seed: int = EVAL_SEED,
    tiles: TileCoding | None = None,
) -> float:
    """The return of the model's greedy policy: exact where the world has a transition table
    (expected_return), else its mean over `episodes` fixed seeds (played locally; `tiles`: the
    loop's tile coding of context features)."""
    if not model:
        return float("nan")
    env = make_env(env_id, max_steps)
    actions = envs.action_list(env.action_space)
    pairs = [(a["id"], a["features"]) for a in actions]
    score: Callable[[bytes], list[float]]
    if loop_kind(kind).episodic:
        ranker = RLRanker(model, 0.0)
        score = ranker.values
    else:
        score = CBRanker(model).predict

    def act(obs: Any) -> int:
        context = envs.observation_features(obs)
        if tiles is not None:
            context = tiles.apply(context)
        values = score(context_json(context, pairs))
        return int(actions[int(np.argmax(values))]["id"])

    return policy_return(env, act, max_steps, episodes, seed)
