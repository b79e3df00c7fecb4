"""Learning: trainers that live in a child (TrainerHost, RemoteTrainer), a batch of lines or
episodes per call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from learners.sandbox.process import Child
from learners.sandbox.protocol import NativeCrash, SandboxError


class TrainerLost(SandboxError):
    """The child that held this trainer died (or was restarted): rebuild from a checkpoint."""


class TrainerHost:
    """The learning child of one worker thread and the trainers in it, by key (a loop)."""

    def __init__(self, *, nice: int = 10) -> None:
        self.child = Child(nice=nice)

    def open(
        self,
        key: str,
        *,
        kind: str,
        args: str,
        model: bytes | None = None,
        examples: int = 0,
        gamma: float = 0.99,
    ) -> RemoteTrainer:
        header = {"key": key, "kind": kind, "args": args, "examples": examples, "gamma": gamma}
        self.child.call("open", header, model or b"")
        return RemoteTrainer(self, key, args, examples, self.child.generation)

    def close(self) -> None:
        self.child.close()


class RemoteTrainer:
    """learners.cb.CBTrainer / learners.rl.RLTrainer living in a TrainerHost's child.

    `learn_lines` learns a batch and returns, per line VW refused, (index, message); a crash of
    the child raises NativeCrash and then TrainerLost on every later use."""

    def __init__(self, host: TrainerHost, key: str, args: str, examples: int, generation: int):
        self.host = host
        self.key = key
        self.args = args
        self.examples = examples
        self._generation = generation

    @property
    def lost(self) -> bool:
        """True once the child holding this trainer died (or was restarted since)."""
        return self.host.child.generation != self._generation or self.host.child._proc is None

    def _call(self, op: str, header: dict[str, Any], blob: bytes = b"") -> tuple[Any, bytes]:
        if self.lost:
            raise TrainerLost(f"the learning process of {self.key} was restarted")
        return self.host.child.call(op, {"key": self.key, **header}, blob)

    def learn_lines(self, lines: list[str]) -> list[tuple[int, str]]:
        if not lines:
            return []
        out, _ = self._call("learn", {}, "\n".join(lines).encode())
        self.examples = int(out["examples"])
        return [(int(i), str(m)) for i, m in out["errors"]]

    def learn_episodes(
        self, episodes: list[tuple[list[tuple[str, float, bool]], bool]], gamma: float
    ) -> list[tuple[int, str]]:
        """RL: learn complete episodes (steps of (line, reward, learnable), terminated)."""
        out, _ = self._call("learn_episodes", {"episodes": episodes, "gamma": gamma})
        self.examples = int(out["examples"])
        return [(int(i), str(m)) for i, m in out["errors"]]

    def remember_episodes(self, episodes: list[tuple[list[tuple[str, float, bool]], bool]]) -> None:
        """RL: episodes its model learned already, oldest first (learners.rl.RLTrainer.remember)."""
        if episodes:
            self._call("remember_episodes", {"episodes": episodes})

    def to_bytes(self) -> bytes:
        _, model = self._call("save", {})
        return model

    def close(self) -> None:
        if not self.lost:
            self.host.child.call("close", {"key": self.key})


@dataclass
class Learned:
    """What `learn_in_turn` did with a batch of (position, line) items."""

    refused: list[tuple[int, str, str]]  # (position, line, why) VW refused: dead-letter them
    crashed: bool = False  # the learning process died: every trainer in it is lost
    poison: tuple[int, str, str] | None = None  # the line it died on, when that was learned alone
    careful_until: int = 0  # else: learn one line per call up to here, from the checkpoint


def learn_in_turn(
    trainer: RemoteTrainer, items: list[tuple[int, str]], careful_until: int = 0
) -> Learned:
    """Learn `items` (ascending positions): one call per line up to `careful_until` (after a
    crash, to find the line that did it), the rest in one call. A crash on a lone line names
    it; a crash on a batch says how far to go carefully next time. Either way the caller
    rebuilds its trainers from their checkpoints: what they learned since is gone."""
    chunks = [[item] for item in items if item[0] <= careful_until]
    rest = [item for item in items if item[0] > careful_until]
    if rest:
        chunks.append(rest)
    out = Learned([])
    for chunk in chunks:
        try:
            refused = trainer.learn_lines([line for _, line in chunk])
        except NativeCrash as exc:
            out.crashed = True
            if len(chunk) == 1:
                out.poison = (*chunk[0], f"native crash while learning: {exc}")
            else:
                out.careful_until = chunk[-1][0]
            return out
        out.refused += [(*chunk[i], f"Vowpal Wabbit refused it: {why}") for i, why in refused]
    return out
