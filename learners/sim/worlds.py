"""Synthetic contextual-bandit worlds with known optimal policies, for tests, benchmarks and
`dloop simulate`.

A world draws a context, the caller picks an action, the world answers a Bernoulli reward whose
probability depends on the context-action pair. Everything is driven by one seed so a run is
repeatable; the expected reward of every action is exposed so regret is measured exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CBWorld:
    """Users with a few categorical traits; each (trait value, action) pair adds to a logit.

    `expected(ctx_index)` gives every action's click probability, so the oracle and the uniform
    policy's value are known in closed form.
    """

    n_actions: int = 10
    traits: tuple[tuple[str, int], ...] = (("country", 4), ("device", 3), ("segment", 5))
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)
    _noise: np.random.Generator = field(init=False, repr=False)
    _weights: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Contexts and reward noise come from separate streams, so every policy run on the same
        # seed sees the same contexts and the same noise whatever it chooses.
        self._rng = np.random.default_rng(self.seed)
        self._noise = np.random.default_rng(self.seed + 1)
        gen = np.random.default_rng(self.seed + 7919)
        self._weights = {
            name: gen.normal(0, 1.2, size=(k, self.n_actions)) for name, k in self.traits
        }
        self._bias = gen.normal(-1.0, 0.3, size=self.n_actions)

    @property
    def action_ids(self) -> list[str]:
        return [f"a{i}" for i in range(self.n_actions)]

    def actions(self) -> list[dict[str, Any]]:
        """Personalizer-style actions: each carries its id and a category feature."""
        return [
            {"id": aid, "features": [{"kind": f"k{i % 3}", "slot": i}]}
            for i, aid in enumerate(self.action_ids)
        ]

    def draw_context(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        values = {name: int(self._rng.integers(k)) for name, k in self.traits}
        return values, [{name: f"{name}{v}" for name, v in values.items()}]

    def expected(self, values: dict[str, int]) -> np.ndarray:
        logit = self._bias + sum(self._weights[name][v] for name, v in values.items())
        probabilities: np.ndarray = 1.0 / (1.0 + np.exp(-logit))
        return probabilities

    def reward(self, values: dict[str, int], action_index: int) -> float:
        return float(self._noise.random() < self.expected(values)[action_index])


@dataclass
class Scores:
    """Expected reward of each choice next to the uniform policy's and the oracle's."""

    chosen: list[float] = field(default_factory=list)
    uniform: list[float] = field(default_factory=list)
    oracle: list[float] = field(default_factory=list)

    def add(self, expected: np.ndarray, action_index: int) -> None:
        self.chosen.append(float(expected[action_index]))
        self.uniform.append(float(expected.mean()))
        self.oracle.append(float(expected.max()))

    def tail(self, fraction: float = 1 / 3) -> tuple[float, float, float]:
        """Mean (chosen, uniform, oracle) over the last `fraction` of the run."""
        k = int(len(self.chosen) * (1 - fraction))
        return (
            float(np.mean(self.chosen[k:])),
            float(np.mean(self.uniform[k:])),
            float(np.mean(self.oracle[k:])),
        )

    def progress(self, fraction: float = 1 / 3) -> float:
        """How far from uniform (0) to the oracle (1) the policy got over the tail."""
        chosen, uniform, oracle = self.tail(fraction)
        return (chosen - uniform) / (oracle - uniform)


def delays(seed: int, n: int, max_delay: int) -> list[int]:
    """How many decisions later each decision's reward arrives (uniform 0..max_delay)."""
    return [int(d) for d in np.random.default_rng(seed + 2).integers(0, max_delay + 1, size=n)]


@dataclass
class PageWorld:
    """A page of slots with slot-dependent click rates: each user type likes different actions,
    and the slots get different attention (the first most). Expected clicks of any slate are
    known exactly, so a learned slate is scored against the best and the random one."""

    likes: tuple[tuple[float, ...], ...] = ((0.5, 0.3, 0.1, 0.0), (0.0, 0.1, 0.3, 0.5))
    attention: tuple[float, ...] = (0.6, 0.35, 0.15)

    @property
    def n_actions(self) -> int:
        return len(self.likes[0])

    def click(self, user: int, slot: int, action: int) -> float:
        return 0.02 + self.attention[slot] * self.likes[user][action]

    def value(self, user: int, slate: tuple[int, ...]) -> float:
        return sum(self.click(user, k, a) for k, a in enumerate(slate))

    def slates(self) -> list[tuple[int, ...]]:
        import itertools

        return list(itertools.permutations(range(self.n_actions), len(self.attention)))

    def progress(self, chosen: dict[int, tuple[int, ...]]) -> float:
        """Share of the way from random slates (0) to the best ones (1), users equally likely."""
        users = range(len(self.likes))
        rand = np.mean([np.mean([self.value(u, s) for s in self.slates()]) for u in users])
        best = np.mean([max(self.value(u, s) for s in self.slates()) for u in users])
        got = np.mean([self.value(u, chosen[u]) for u in users])
        return float((got - rand) / (best - rand))


@dataclass
class ShopWorld:
    """A shop with three outcomes per shown offer: a click, a purchase (its value) and an
    unsubscribe, whose probabilities depend on the user's segment and the offer. Clickbait gets
    the clicks, premium the revenue, and both cost unsubscribes, so objectives disagree. Every
    expected outcome is known (`expected`), so any policy's true value on any contexts is exact.
    """

    seed: int = 0
    segments: tuple[str, ...] = ("bargain", "loyal", "casual")
    offers: tuple[str, ...] = ("clickbait", "deal", "premium", "digest")
    # Per segment, per offer: P(click), P(purchase), P(unsubscribe); `price` per offer.
    click: tuple[tuple[float, ...], ...] = (
        (0.60, 0.30, 0.05, 0.10),
        (0.40, 0.25, 0.20, 0.15),
        (0.50, 0.20, 0.05, 0.10),
    )
    purchase: tuple[tuple[float, ...], ...] = (
        (0.02, 0.20, 0.02, 0.01),
        (0.02, 0.10, 0.30, 0.02),
        (0.01, 0.05, 0.05, 0.01),
    )
    unsubscribe: tuple[tuple[float, ...], ...] = (
        (0.15, 0.02, 0.02, 0.01),
        (0.05, 0.01, 0.01, 0.01),
        (0.20, 0.02, 0.10, 0.01),
    )
    price: tuple[float, ...] = (20.0, 30.0, 120.0, 10.0)
    _rng: np.random.Generator = field(init=False, repr=False)
    _noise: np.random.Generator = field(init=False, repr=False)

    OUTCOMES = ("click", "purchase", "unsubscribe")

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._noise = np.random.default_rng(self.seed + 1)

    def actions(self, order: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """The offers as a rank request's actions (in `order`: its first is the baseline)."""
        return [
            {"id": offer, "features": [{"offer": offer, "price": self.price[i]}]}
            for i, offer in sorted(
                enumerate(self.offers), key=lambda x: (order or self.offers).index(x[1])
            )
        ]

    def draw_context(self) -> tuple[int, list[dict[str, Any]]]:
        s = int(self._rng.integers(len(self.segments)))
        return s, [{"segment": self.segments[s]}]

    def expected(self, segment: int, offer: int) -> dict[str, float]:
        """The expected outcomes of showing `offer` to a user of `segment`."""
        return {
            "click": self.click[segment][offer],
            "purchase": self.purchase[segment][offer] * self.price[offer],
            "unsubscribe": self.unsubscribe[segment][offer],
        }

    def outcomes(self, segment: int, offer: int) -> dict[str, float]:
        """Drawn outcomes (a purchase at most once, worth the offer's price)."""
        u = self._noise.random(3)
        return {
            "click": float(u[0] < self.click[segment][offer]),
            "purchase": float(u[1] < self.purchase[segment][offer]) * self.price[offer],
            "unsubscribe": float(u[2] < self.unsubscribe[segment][offer]),
        }

    def value(self, pmfs: list[tuple[int, list[float]]]) -> dict[str, float]:
        """A policy's true expected outcomes on these (segment, probabilities over offers)."""
        total = dict.fromkeys(self.OUTCOMES, 0.0)
        for segment, pmf in pmfs:
            for offer, p in enumerate(pmf):
                for name, v in self.expected(segment, offer).items():
                    total[name] += p * v
        return {name: v / len(pmfs) for name, v in total.items()}

    def best(self, outcome: str, sign: float = 1.0) -> list[int]:
        """Per segment, the offer that maximises sign * `outcome`."""
        offers = range(len(self.offers))
        return [
            max(offers, key=lambda a: sign * self.expected(segment, a)[outcome])
            for segment in range(len(self.segments))
        ]
