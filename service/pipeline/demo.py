"""`dloop demo` (`make demo`): simulated traffic on built-in worlds, so a newcomer opens the
dashboard and watches loops learn.

- `default`: users with a few traits arrive (learners.sim.worlds.CBWorld, whose best action per
  user is known), each is ranked a few articles with a sticky `unitId`, and clicks (reward 1) or
  not; 10% of users are held out and served the first article (the baseline), so the
  dashboard's uplift shows what learning earns.
- `shop` (with `shop=True`): offers in a shop with three outcomes (learners.sim.worlds.ShopWorld:
  click, purchase value, unsubscribe), trained for `clip(click + purchase / 200, 0, 1)`, with a
  guardrail that unsubscribes must not rise by more than half over the holdout's: the objective
  favours clickbait, which drives unsubscribes up, so the guardrail breaches and the loop falls
  back to its holdout policy (the digest) while the dashboard shows why."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import numpy as np

from learners.sim.worlds import CBWorld, ShopWorld
from service.client import Client, DloopError

USERS = 500
SHOP = "shop"
SHOP_OFFERS = ("digest", "deal", "premium", "clickbait")  # the first one is the baseline
SHOP_CONFIG = {
    "outcomes": [
        {"name": "click", "aggregation": "max", "min": 0, "max": 1},
        {"name": "purchase", "aggregation": "sum", "min": 0, "max": 500},
        {"name": "unsubscribe", "aggregation": "max", "min": 0, "max": 1},
    ],
    "rewardDefinition": "clip(click + purchase / 200, 0, 1)",
    "guardrails": [
        {"outcome": "unsubscribe", "mustNot": "increase", "tolerance": 0.5, "action": "fallback"}
    ],
}


def wait_until_up(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"dloop did not answer at {url}")
        time.sleep(0.2)


def traffic(
    url: str,
    key: str,
    *,
    rate: float = 20.0,
    holdout: float = 10.0,
    decisions: int | None = None,
    stop: threading.Event | None = None,
    seed: int = 0,
    shop: bool = False,
) -> int:
    """Rank and reward on the default loop at about `rate` decisions a second (0: as fast as
    possible) until `decisions` were made or `stop` is set; returns how many were made. The loop
    is configured first: `holdout` percent held out, models published every second. With
    `shop`, the shop loop (module docstring) gets a decision alongside each one."""
    wait_until_up(url)
    world = CBWorld(n_actions=6, seed=seed)
    rng = np.random.default_rng(seed)
    traits = [world.draw_context() for _ in range(USERS)]  # each user keeps their traits
    made = 0
    shopping = _Shop(url, key, holdout=holdout, seed=seed) if shop else None
    with Client(url, key=key) as client:
        client.configure(
            holdoutPercentage=holdout,
            holdoutPolicy="baseline",
            modelExportFrequency="PT1S",
            explorationPercentage=0.2,
        )
        start = time.monotonic()
        while (decisions is None or made < decisions) and not (stop and stop.is_set()):
            user = int(rng.integers(USERS))
            values, context = traits[user]
            event_id = uuid.uuid4().hex
            try:
                out = client.rank(context, world.actions(), event_id=event_id, unit_id=f"u{user}")
                chosen = world.action_ids.index(out["rewardActionId"])
                client.reward(event_id, world.reward(values, chosen))
                if shopping is not None:
                    shopping.step(user)
            except (DloopError, httpx.HTTPError):
                time.sleep(0.5)  # the server is busy or going away: try again shortly
                continue
            made += 1
            if rate > 0:
                ahead = made / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    if shopping is not None:
        shopping.client.close()
    return made


class _Shop:
    """The shop loop's traffic: one offer per step, then its outcomes (those that happened)."""

    def __init__(self, url: str, key: str, *, holdout: float, seed: int) -> None:
        self.world = ShopWorld(seed=seed)
        self.client = Client(url, key=key, loop=SHOP)
        self.client.create_loop("cb")  # or keep it, with its history
        self.client.configure(
            holdoutPercentage=max(holdout, 5.0),
            holdoutPolicy="baseline",
            modelExportFrequency="PT1S",
            rewardWaitTime="PT5S",
            **SHOP_CONFIG,
        )
        self.segments = [self.world.draw_context() for _ in range(USERS)]

    def step(self, user: int) -> None:
        segment, context = self.segments[user]
        event_id = uuid.uuid4().hex
        out = self.client.rank(
            context, self.world.actions(SHOP_OFFERS), event_id=event_id, unit_id=f"u{user}"
        )
        drawn = self.world.outcomes(segment, self.world.offers.index(out["rewardActionId"]))
        self.client.outcomes(event_id, {k: v for k, v in drawn.items() if v or k == "click"})
