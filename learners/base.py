"""The learner contract shared by every loop kind."""

from __future__ import annotations

from typing import Protocol


class Ranker(Protocol):
    """A served model. Not thread-safe: one caller at a time, swapped whole on a new model."""

    def predict(self, context: bytes) -> list[float]:
        """Probability of each action in the `_multi` list of `context` (DSJSON `c` JSON)."""
        ...


class Trainer(Protocol):
    """Learns from joined DSJSON lines; `to_bytes` is a resumable checkpoint of the model."""

    examples: int

    def learn(self, line: bytes) -> None: ...

    def to_bytes(self) -> bytes: ...
