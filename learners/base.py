"""What each loop kind's learners promise: the protocols the rest of dloop codes against.

A ranker scores a decision's actions from a trained model; a trainer learns online and
resumes exactly from its own `to_bytes()` (VW's `--save_resume` model bytes, which are also
what a ranker is built from). Every learner is deterministic given its inputs and seeds.

    kind  ranker                               trainer
    cb    CBRanker.predict -> pmf              CBTrainer.learn_text(DSJSON line)
    ccb   CCBRanker.rank -> per-slot choices   CBTrainer (VW's DSJSON parser reads CCB lines)
    rl    RLRanker.predict -> pmf, .values     RLTrainer.learn_episode(steps, terminated)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from learners.rl import Step


class Ranker(Protocol):
    """Single-decision loops (cb, rl): the probability of each action, in the given order."""

    def predict(self, context: bytes) -> list[float]: ...


class SlotRanker(Protocol):
    """Multi-slot loops (ccb): per slot the chosen action, the candidates in served order and
    their probabilities; `seed` (from the eventId) makes the draw repeatable."""

    def rank(
        self, c: dict[str, Any], allowed: Sequence[Sequence[int]], seed: str
    ) -> list[tuple[int, list[int], list[float]]]: ...


class Trainer(Protocol):
    """Anything that learns: how many examples its model holds, and the model's bytes."""

    args: str
    examples: int

    def to_bytes(self) -> bytes: ...

    def close(self) -> None: ...


class LineTrainer(Trainer, Protocol):
    """Bandit loops (cb, ccb): learns one joined DSJSON line at a time."""

    def learn_text(self, line: str) -> None: ...


class EpisodeTrainer(Trainer, Protocol):
    """RL loops: learns a complete episode at once (returns need the steps that follow)."""

    def learn_episode(self, steps: Sequence[Step], terminated: bool) -> None: ...
