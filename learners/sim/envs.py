"""Gymnasium environments dloop ships for `dloop simulate` and its tests.

- `dloop/DelayedKey-v0`: the reward comes only at the end of a long episode. At the first step
  the agent takes a key (no reward now) or a coin (0.1 now); then `length - 1` steps where nothing
  it does matters; at the end a door opens, paying 1, only for an agent holding the key. A
  contextual bandit maximises the next reward, so it takes the coin (return 0.1); a learner of
  discounted return takes the key (return 1). The observation is (step, holding the key).
- `dloop/ContextualBandit-v0`: one-step episodes over `learners.sim.worlds.CBWorld`
  (categorical user traits, Bernoulli clicks), so `dloop simulate` can drive cb loops too.
- `dloop/Inventory-v0`: 15 days of a shop's stock. Each day the agent orders 0 to 3 units
  (each costs, and any order has a fixed cost), a random demand sells what is in stock, what is
  left costs to hold. The observation is (day, stock), two categorical features as a shop's app
  would send them; the transition table `P` (as gymnasium's toy-text worlds have, by state
  index: `state_index(obs)`) gives the optimum by value iteration.
- `dloop/NoisyCorridor-v0`: walk right along a corridor to its end (+1, less a small cost per
  step); the observation is the position and 20 features of random noise, redrawn each step.
  No state is ever seen twice, so a learner must generalise over features to learn at all.

`observation_features` turns any discrete or box observation into Personalizer context features,
and `action_list` a discrete action space into actions, in the layout the tabular RL policy
(`learners.rl.TABULAR_RL_POLICY`) crosses: the state in namespace `state`, the action in `action`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from learners.sim.worlds import CBWorld


class DelayedKey(gym.Env[Any, Any]):
    metadata: dict[str, Any] = {"render_modes": []}
    COIN, KEY = 0, 1  # a blank model (ties: first action) takes the coin

    def __init__(self, length: int = 10) -> None:
        self.length = length
        # state = 2 * step + holding the key
        self.observation_space = spaces.Discrete(2 * length)
        self.action_space = spaces.Discrete(2)
        self.step_index = 0
        self.key = False

    def _obs(self) -> int:
        return 2 * self.step_index + int(self.key)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        super().reset(seed=seed)
        self.step_index, self.key = 0, False
        return self._obs(), {}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        reward = 0.0
        if self.step_index == 0:
            if action == self.KEY:
                self.key = True
            else:
                reward = 0.1
        self.step_index += 1
        terminated = self.step_index >= self.length
        if terminated and self.key:
            reward += 1.0
        return self._obs() if not terminated else 0, reward, terminated, False, {}


class ContextualBandit(gym.Env[Any, Any]):
    """One decision per episode: observe a user, pick an action, get a click or not."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, n_actions: int = 5, seed: int = 0) -> None:
        self.world = CBWorld(n_actions=n_actions, traits=(("country", 4), ("device", 3)), seed=seed)
        self.observation_space = spaces.MultiDiscrete([4, 3])
        self.action_space = spaces.Discrete(n_actions)
        self._values: dict[str, int] = {}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._values, _ = self.world.draw_context()
        return np.array([self._values["country"], self._values["device"]]), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        p = float(self.world.expected(self._values)[action])
        reward = float(self.np_random.random() < p)
        return np.array([0, 0]), reward, True, False, {"expected": p}


class Inventory(gym.Env[Any, Any]):
    metadata: dict[str, Any] = {"render_modes": []}
    DAYS, MAX_STOCK, START = 15, 8, 2
    DEMAND = ((0, 0.2), (1, 0.35), (2, 0.3), (3, 0.15))  # units wanted a day, probability
    PRICE, UNIT_COST, ORDER_COST, HOLDING = 1.0, 0.4, 0.3, 0.05

    def __init__(self) -> None:
        # What the shop sees, as its app would send it: the day and the stock, two features.
        self.observation_space = spaces.MultiDiscrete([self.DAYS, self.MAX_STOCK + 1])
        self.action_space = spaces.Discrete(4)  # units to order
        self.day, self.stock = 0, self.START
        # The transition table value iteration reads, by state index (`state_index`).
        self.P = {
            self._index(day, stock): {a: self._outcomes(day, stock, a) for a in range(4)}
            for day in range(self.DAYS)
            for stock in range(self.MAX_STOCK + 1)
        }
        # Every run starts on day 0 with START units.
        self.initial_state_distrib = np.zeros(len(self.P))
        self.initial_state_distrib[self._index(0, self.START)] = 1.0

    def _index(self, day: int, stock: int) -> int:
        return day * (self.MAX_STOCK + 1) + stock

    def state_index(self, obs: Any) -> int:
        """The index in `P` of an observation (day, stock)."""
        day, stock = (int(v) for v in obs)
        return self._index(day, stock)

    def observation_of(self, index: int) -> np.ndarray:
        """The observation (day, stock) of `P`'s state `index`."""
        return np.array(divmod(index, self.MAX_STOCK + 1))

    def _obs(self) -> np.ndarray:
        return np.array([self.day, self.stock])

    def _day(self, stock: int, order: int, demand: int) -> tuple[int, float]:
        """The stock left and the day's profit."""
        stocked = min(self.MAX_STOCK, stock + order)
        sold = min(stocked, demand)
        left = stocked - sold
        cost = self.UNIT_COST * order + (self.ORDER_COST if order else 0.0)
        return left, self.PRICE * sold - cost - self.HOLDING * left

    def _outcomes(self, day: int, stock: int, order: int) -> list[tuple[float, int, float, bool]]:
        done = day + 1 >= self.DAYS
        out = []
        for demand, p in self.DEMAND:
            left, reward = self._day(stock, order, demand)
            out.append((p, 0 if done else self._index(day + 1, left), reward, done))
        return out

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.day, self.stock = 0, self.START
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        demands, probabilities = zip(*self.DEMAND, strict=True)
        demand = int(self.np_random.choice(demands, p=probabilities))
        self.stock, reward = self._day(self.stock, int(action), demand)
        self.day += 1
        done = self.day >= self.DAYS
        # (The last day's successor is P's state 0, as in the table.)
        return np.array([0, 0]) if done else self._obs(), reward, done, False, {}


class NoisyCorridor(gym.Env[Any, Any]):
    metadata: dict[str, Any] = {"render_modes": []}
    LENGTH, NOISE, NOISE_VALUES, STEP_COST = 10, 20, 8, 0.02
    LEFT, RIGHT = 0, 1

    def __init__(self) -> None:
        self.observation_space = spaces.MultiDiscrete(
            [self.LENGTH] + [self.NOISE_VALUES] * self.NOISE
        )
        self.action_space = spaces.Discrete(2)
        self.position = 0

    def _obs(self) -> np.ndarray:
        noise = self.np_random.integers(self.NOISE_VALUES, size=self.NOISE)
        return np.concatenate([[self.position], noise]).astype(np.int64)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position = 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        move = 1 if action == self.RIGHT else -1
        self.position = min(self.LENGTH - 1, max(0, self.position + move))
        done = self.position == self.LENGTH - 1
        reward = (1.0 if done else 0.0) - self.STEP_COST
        return self._obs(), reward, done, False, {}

    @classmethod
    def optimum(cls) -> float:
        return 1.0 - cls.STEP_COST * (cls.LENGTH - 1)


def register() -> None:
    for env_id, entry in (
        ("dloop/DelayedKey-v0", "learners.sim.envs:DelayedKey"),
        ("dloop/ContextualBandit-v0", "learners.sim.envs:ContextualBandit"),
        ("dloop/Inventory-v0", "learners.sim.envs:Inventory"),
        ("dloop/NoisyCorridor-v0", "learners.sim.envs:NoisyCorridor"),
    ):
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=entry)


register()


def observation_features(observation: Any) -> list[dict[str, Any]]:
    """Context features for an observation: a discrete state is one categorical feature, a
    vector of integers one categorical feature per position, a float vector a numeric array."""
    arr = np.asarray(observation)
    if arr.ndim == 0:
        return [{"state": {"s": str(int(arr))}}]
    if np.issubdtype(arr.dtype, np.integer):
        return [{"state": {f"s{i}": str(int(v)) for i, v in enumerate(arr.ravel())}}]
    return [{"state": {"x": [float(v) for v in arr.ravel()]}}]


def action_list(space: spaces.Space[Any]) -> list[dict[str, Any]]:
    if not isinstance(space, spaces.Discrete):
        raise ValueError("dloop simulate needs a discrete action space")
    start = int(space.start)
    return [
        {"id": str(a), "features": [{"action": {"a": str(a)}}]}
        for a in range(start, start + int(space.n))
    ]
