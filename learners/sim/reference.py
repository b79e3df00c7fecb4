"""A hand-built, in-process VW contextual-bandit loop: the yardstick for the served loop.

It learns each reward the moment it arrives (no log, no join, no model export), so the only
difference from dloop's served policy is the service itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import vowpalwabbit

from learners.features import cb_line, context_json
from learners.sampling import sample
from learners.sim.worlds import CBWorld, Scores, delays


def run_reference(
    args: str, *, n: int = 4000, max_delay: int = 40, seed: int = 0, world: CBWorld | None = None
) -> Scores:
    world = world or CBWorld(seed=seed)
    actions = [(a["id"], a["features"]) for a in world.actions()]
    trainer = vowpalwabbit.Workspace(f"{args} --dsjson --quiet")
    arrivals: dict[int, list[tuple[bytes, int, float, float]]] = defaultdict(list)
    lag = delays(seed, n, max_delay)
    scores = Scores()
    for t in range(n):
        for context, chosen, p, reward in arrivals.pop(t, []):
            line = cb_line(
                event_id=str(t),
                timestamp="",
                context=context,
                ranking=[chosen],
                probabilities=[p],
                model_id="ref",
                cost=-reward,
                original_cost=-reward,
            )
            examples = trainer.parse(line.decode())
            trainer.learn(examples)
            trainer.finish_example(examples)
        values, features = world.draw_context()
        context = context_json(features, actions)
        # An unlabelled DSJSON line: the same parser, so the same features, as learning uses.
        examples = trainer.parse('{"a":[1],"c":' + context.decode() + ',"p":[1]}')
        pmf = list(trainer.predict(examples))
        trainer.finish_example(examples)
        chosen = sample(pmf, f"ref/{seed}/{t}")
        expected = world.expected(values)
        scores.add(expected, chosen)
        reward = world.reward(values, chosen)
        arrivals[t + lag[t]].append((context, chosen, pmf[chosen], reward))
    trainer.finish()
    return scores


def run_served(
    rank: Callable[[dict[str, Any]], dict[str, Any]],
    reward: Callable[[str, float], None],
    tick: Callable[[int], None],
    *,
    n: int = 4000,
    max_delay: int = 40,
    seed: int = 0,
) -> Scores:
    """Drive a served loop through `rank`/`reward` on the same world, contexts, noise and reward
    delays as `run_reference`; `tick(t)` runs before decision t (advance clocks, run workers)."""
    world = CBWorld(seed=seed)
    actions = world.actions()
    ids = world.action_ids
    arrivals: dict[int, list[tuple[str, float]]] = defaultdict(list)
    lag = delays(seed, n, max_delay)
    scores = Scores()
    for t in range(n):
        tick(t)
        for event_id, value in arrivals.pop(t, []):
            reward(event_id, value)
        values, features = world.draw_context()
        event_id = f"sim-{seed}-{t}"
        response = rank({"contextFeatures": features, "actions": actions, "eventId": event_id})
        chosen = ids.index(response["rewardActionId"])
        scores.add(world.expected(values), chosen)
        arrivals[t + lag[t]].append((event_id, world.reward(values, chosen)))
    return scores
