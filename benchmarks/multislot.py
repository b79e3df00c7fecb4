"""Multi-slot learning speed: how close each named CCB policy's greedy slate gets to the best
slate on a simulated 3-slot page (learners.worlds.PageWorld), after N pages learned online with
models published every 100 pages, as the service does."""

from __future__ import annotations

import numpy as np

from learners.cb import CBTrainer
from learners.ccb import NAMED_CCB_POLICIES, CCBRanker, ccb_context, ccb_line
from learners.policy import with_exploration
from learners.sim.worlds import PageWorld

ACTIONS = [(f"a{i}", [{"kind": {"k": f"k{i}"}}]) for i in range(4)]
SLOTS = [(s, [{"slot": {"pos": s}}]) for s in ("hero", "side", "foot")]


def context(user: int) -> dict[str, object]:
    return ccb_context(
        [{"user": {"u": f"u{user}"}}], ACTIONS, [(s, f, list(range(4))) for s, f in SLOTS]
    )


def greedy_slates(ranker: CCBRanker) -> dict[int, tuple[int, ...]]:
    out = {}
    for user in range(2):
        c = context(user)
        taken: list[int] = []
        for slot in c["_slots"]:  # type: ignore[attr-defined]
            free = [a for a in range(4) if a not in taken]
            taken.append(free[int(np.argmax(ranker.slot_pmf(c, slot, free)))])
        out[user] = tuple(taken)
    return out


def run(args: str, pages: int, seed: int) -> float:
    world = PageWorld()
    rng = np.random.default_rng(seed)
    trainer = CBTrainer(args)
    ranker = CCBRanker(None)
    for i in range(pages):
        user = int(rng.integers(2))
        c = context(user)
        outcomes = []
        for k, (chosen, order, probs) in enumerate(
            ranker.rank(c, [list(range(4))] * 3, f"{seed}/{i}")
        ):
            r = float(rng.random() < world.click(user, k, chosen))
            outcomes.append({"id": SLOTS[k][0], "a": order, "p": probs, "cost": -r, "original": -r})
        trainer.learn(
            ccb_line(
                event_id=f"e{i}",
                timestamp="2026-01-01T00:00:00Z",
                c=c,
                outcomes=outcomes,
                baselines=[0, 1, 2],
                model_id="m",
            )
        )
        if i % 100 == 99:
            ranker = CCBRanker(trainer.to_bytes())
    return world.progress(greedy_slates(CCBRanker(trainer.to_bytes())))


def learning(pages: list[int], seeds: int) -> list[tuple[str, str]]:
    """Mean progress over `seeds` seeds after each number of pages (single runs vary a lot: one
    unlucky seed leaves a user on a second-best slate, so few seeds mislead)."""
    policies = {**NAMED_CCB_POLICIES, "vw-default-ccb": "--ccb_explore_adf -q ::"}
    rows = []
    for name, args in policies.items():
        cells = []
        for n in pages:
            scores = [run(with_exploration(args, 0.2), n, s) for s in range(seeds)]
            cells.append(f"{n} pages {np.mean(scores):.2f} (min {min(scores):.2f})")
        rows.append((f"{name}: {args}", ";  ".join(cells)))
    return rows
