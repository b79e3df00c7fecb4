"""`dloop demo` (`make demo`): simulated traffic on a built-in world, so a newcomer opens the
dashboard and watches a loop learn. Users with a few traits arrive (learners.sim.worlds.CBWorld,
whose best action per user is known), each is ranked a few articles with a sticky `unitId`, and
clicks (reward 1) or not; 10% of users are held out and served the first article (the
baseline), so the dashboard's uplift shows what learning earns."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import numpy as np

from learners.sim.worlds import CBWorld
from service.client import Client, DloopError

USERS = 500


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
) -> int:
    """Rank and reward on the default loop at about `rate` decisions a second (0: as fast as
    possible) until `decisions` were made or `stop` is set; returns how many were made. The loop
    is configured first: `holdout` percent held out, models published every second."""
    wait_until_up(url)
    world = CBWorld(n_actions=6, seed=seed)
    rng = np.random.default_rng(seed)
    traits = [world.draw_context() for _ in range(USERS)]  # each user keeps their traits
    made = 0
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
            except (DloopError, httpx.HTTPError):
                time.sleep(0.5)  # the server is busy or going away: try again shortly
                continue
            made += 1
            if rate > 0:
                ahead = made / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    return made
