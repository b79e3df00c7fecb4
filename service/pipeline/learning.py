"""One checkpointed learner for every path that learns: the embedded worker, the stream learner
(`dloop learn`), RL episodes, a retrain after a policy change, and offline replay.

A loop's model lives in its checkpoint (storage.models.ModelCheckpoint): the trainer's bytes,
the VW arguments they were trained with and the position in the loop's joined stream they
include. A `Learner` is that checkpoint brought back into a trainer of a learning sandbox
(learners.sandbox), so VW crashing on a line kills a child process, never the server:
- `open_learner` loads the checkpoint, but continues its model only if it was trained with the
  arguments the loop's policy trains now; else it starts blank from the checkpoint's position
  (VW would go on with the arguments stored in the model, and the checkpoint would claim the
  new ones); the blank model replaces the stored one at the next save;
- the trainer learns lines (`Learners.learn`; `retrain`, after a reset) or episodes
  (`train_episodes`);
- `save` (or `checkpoint`: the model if it learned anything, else the position) writes it back
  with its position in the caller's transaction, so a crash leaves both as they were; the
  caller publishes the bytes it returns.
`dloop replay` (service.pipeline.replay) starts one without a checkpoint and keeps the bytes.

`Learners` holds a worker thread's learners, one per loop, and what a crash of their learning
process asks of them.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from learners.outcomes import RewardRules, relabel
from learners.sandbox import NativeCrash, RemoteTrainer, TrainerHost, learn_in_turn
from service.core.kinds import RL, LoopKind
from service.pipeline import episodes
from service.storage import store
from service.storage.models import Joined, Loop, ModelCheckpoint

log = logging.getLogger("dloop.learning")

NO_MODEL_ID = "N/A"  # the model id of a loop without a checkpoint


@dataclass
class Learner:
    """A loop's trainer in a learning sandbox and what its checkpoint holds."""

    trainer: RemoteTrainer
    kind: LoopKind
    arguments: str  # the VW arguments it trains
    position: int  # how far into the loop's joined stream it has learned
    model_id: str  # the checkpoint it continues, or its last save
    saved_position: int  # ... that checkpoint's position
    saved_examples: int  # ... and examples
    skip: set[int] = field(default_factory=set)  # dead-lettered positions ahead
    used_at: float = 0.0  # for a worker's schedule: when it was last asked for
    exported_at: float = 0.0  # ... and when its saving was last due
    # What its positions count ("seq": joined rows, embedded; "pos": the joined topic), for a
    # publication's freshness (store.add_publication); None: not a stream learner.
    stream: str | None = None

    @property
    def learned(self) -> bool:
        """Whether it learned an example since its checkpoint."""
        return self.trainer.examples != self.saved_examples

    @property
    def unsaved(self) -> bool:
        """Whether its checkpoint is behind it (examples or position)."""
        return self.learned or self.position != self.saved_position


def start(
    host: TrainerHost,
    ckpt: ModelCheckpoint | None,
    *,
    loop: str,
    kind: LoopKind,
    arguments: str,
    gamma: float = 0.99,
    skip: set[int] | None = None,
) -> Learner:
    """A learner of `arguments` from `ckpt`: its model if it was trained with them, else a blank
    one; at the checkpoint's position either way (0 without one)."""
    trainer_kind = "rl" if kind.episodic else "cb"
    if ckpt is not None and ckpt.model is not None and ckpt.arguments == arguments:
        trainer = host.open(
            loop,
            kind=trainer_kind,
            args=arguments,
            model=ckpt.model,
            examples=ckpt.examples,
            gamma=gamma,
        )
    else:
        trainer = host.open(loop, kind=trainer_kind, args=arguments, gamma=gamma)
    position = ckpt.position if ckpt is not None else 0
    model_id = ckpt.model_id if ckpt is not None else NO_MODEL_ID
    return Learner(
        trainer, kind, arguments, position, model_id, position, trainer.examples, skip or set()
    )


def open_learner(
    session: Session,
    host: TrainerHost,
    *,
    loop: str,
    kind: LoopKind,
    arguments: str,
    gamma: float = 0.99,
    source: str | None = None,
) -> Learner:
    """The loop's learner from its checkpoint (`start`), skipping the positions ahead of it
    that `source` dead-lettered."""
    ckpt = store.get_checkpoint(session, loop=loop)
    skip = None
    if source is not None:
        after = ckpt.position if ckpt is not None else 0
        skip = store.poisoned(session, source=source, loop=loop, after=after)
    return start(host, ckpt, loop=loop, kind=kind, arguments=arguments, gamma=gamma, skip=skip)


def save(session: Session, learner: Learner, *, loop: str, now: float) -> bytes:
    """Write the learner's model, arguments and position as the loop's checkpoint, under a new
    model id, and its publication (store.add_publication), in the caller's transaction;
    returns the model's bytes (to publish)."""
    model = learner.trainer.to_bytes()
    learner.model_id = uuid.uuid4().hex[:16]
    store.add_publication(
        session,
        loop=loop,
        model_id=learner.model_id,
        examples=learner.trainer.examples,
        now=now,
        stream=learner.stream,
        after=learner.saved_position,
        upto=learner.position,
    )
    store.save_checkpoint(
        session,
        loop=loop,
        model_id=learner.model_id,
        model=model,
        arguments=learner.arguments,
        position=learner.position,
        examples=learner.trainer.examples,
        now=now,
    )
    learner.saved_examples = learner.trainer.examples
    learner.saved_position = learner.position
    return model


def checkpoint(session: Session, learner: Learner, *, loop: str, now: float) -> bytes | None:
    """`save` if the learner learned an example since its checkpoint (returns the bytes);
    else only move the checkpoint's position, the model being the same (None). Without a
    checkpoint the position stays in memory: what the learner skipped is read again after a
    restart, and skipped again."""
    if learner.learned:
        return save(session, learner, loop=loop, now=now)
    ckpt = store.get_checkpoint(session, loop=loop)
    if ckpt is not None:
        ckpt.position = learner.position
    learner.saved_position = learner.position
    return None


# A learner leaves an RL loop to the learner that saved its model, while that one saved it
# less than this many of the loop's export intervals ago, and at most HANDOVER_MAX seconds ago
# (train_episodes' `fleet`): a learner that restarts waits at most that long to take its loops
# back, and learners taking turns on a loop with a long interval reopen it once an interval.
HANDOVER_TICKS = 3
HANDOVER_MAX = 30.0


def handover(export_every: float) -> float:
    return min(HANDOVER_TICKS * max(1.0, export_every), HANDOVER_MAX)


def train_episodes(
    session: Session,
    loop: Loop,
    learner: Learner | None,
    *,
    host: TrainerHost,
    now: float,
    limit: int = 1000,
    fleet: bool = False,
) -> tuple[Learner | None, bytes | None]:
    """Learn the RL loop's complete episodes in the caller's transaction (service.pipeline.
    episodes) and save the model; returns the learner (`learner` if it still holds the stored
    model, reopened if it does not: `learner` as it was if there is nothing to learn) and the
    new model's bytes (None if there was nothing to learn).

    A trainer reopened from the stored model (after a restart, or where another learner saved
    it since) is given back the episodes that model learned (episodes.recall): its replay window
    and its outcome counts hold them again, as they did in the trainer that learned them.
    Without them it replayed nothing and averaged nothing until 200 new episodes came (measured,
    benchmarks/rl.py --restart-every 10: slippery FrozenLake's median final greedy return 0.21
    against 0.74).

    `fleet`: other learners may learn this loop too (several `dloop learn` processes, each
    trying every RL loop every tick; the advisory lock lets one at a time). A learner whose
    trainer does not hold the stored model leaves the loop to the one that saved it, while that
    one saved it less than `handover` ago (3 export intervals, at most 30 s): reopening costs a
    recall (about 0.6 s for 10,000 steps), and learners taking turns would pay it every tick.
    When the learner that kept the loop stops, another takes it over after that."""
    episodes.lock(session, loop.name)
    todo = episodes.pending(session, loop=loop.name, limit=limit)
    if todo is None:
        return learner, None
    ckpt = store.get_checkpoint(session, loop=loop.name)
    arguments = loop.policy["arguments"]  # RL loops explore outside VW (learners.rl)
    settings = store.loop_settings(loop)
    gamma = settings.discount
    stored = ckpt.model_id if ckpt is not None else NO_MODEL_ID
    if (
        learner is None
        or learner.trainer.lost
        or learner.model_id != stored
        or learner.arguments != arguments
    ):
        if (
            fleet
            and ckpt is not None
            and ckpt.examples  # a blank model costs nothing to take
            and (learner is None or learner.model_id != stored)
            and now - ckpt.modified_at < handover(settings.export_every)
        ):
            return learner, None  # another learner keeps this loop's model current
        learner = start(host, ckpt, loop=loop.name, kind=RL, arguments=arguments, gamma=gamma)
        if learner.trainer.examples:  # opened from a model that learned episodes
            for batch in episodes.recall(session, loop=loop.name):
                learner.trainer.remember_episodes(batch)
    refused = learner.trainer.learn_episodes(todo.batch(), gamma)
    todo.learned(session, refused=refused, now=now)
    # Episodes come from the database, not the joined stream: the position stays as stored.
    learner.position = ckpt.position if ckpt is not None else 0
    model = save(session, learner, loop=loop.name, now=now)
    store.notify_models(session, [loop.name])
    return learner, model


def retrain(
    session: Session, *, loop: str, kind: LoopKind, arguments: str, lines: list[str], now: float
) -> tuple[bytes, str] | None:
    """Train the loop's checkpoint, just reset to a blank model, on `lines` in a learning
    process of its own and save it in the caller's transaction: (model, id), or None if nothing
    was learned. Lines VW refuses are left out; a crash fails the call, not the server."""
    with sandbox() as host:
        learner = open_learner(session, host, loop=loop, kind=kind, arguments=arguments)
        learner.trainer.learn_lines(lines)
        if not learner.trainer.examples:
            return None
        return save(session, learner, loop=loop, now=now), learner.model_id


def labelled(row: Joined, rules: RewardRules) -> str:
    """A joined row's line as the loop's current reward definition labels it: as joined, or
    relabelled from its outcomes if another version labelled it (learners.outcomes)."""
    if row.reward_version == rules.version:
        return row.line
    return relabel(row.line, rules, apprentice=row.mode == "Apprentice").decode()


@contextlib.contextmanager
def sandbox() -> Iterator[TrainerHost]:
    """A learning process for one job (a retrain, a replay), stopped after it."""
    host = TrainerHost()
    try:
        yield host
    finally:
        host.close()


def close(learner: Learner) -> None:
    with contextlib.suppress(NativeCrash):  # gone already
        learner.trainer.close()


@dataclass
class Trained:
    learner: Learner | None  # None: the loop is gone, or the learning process died
    model: bytes | None  # a new model, if anything was learned
    crashed: bool = False  # the learning process died: every trainer in it is lost


class Learners:
    """A worker thread's learners, one per loop, in one learning process (`host`): `lines` for
    bandit loops, `episodes` for RL loops.

    When the learning process dies every trainer in it is gone: the worker drops them all
    (`lose_all`) and each loop rebuilds from its checkpoint and learns again what followed. The
    batch it died on is then learned one line (one episode) per call, so the one that kills it
    again is found and dead-lettered (with its loop and position: it is never tried again) and
    learning moves on. A line VW refuses goes to the dead letters at once."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        source: str,
        stream: str,
        trainers: TrainerHost | None = None,
        fleet: bool = False,
    ) -> None:
        self.sessions = sessions
        self.source = source  # the dead letters' source (their ref: a position)
        # Other learners (`dloop learn` processes) may learn the same RL loops: one that saved
        # a loop's model lately keeps it (train_episodes' `fleet`).
        self.fleet = fleet
        self.stream = stream  # what positions count (Learner.stream)
        self.host = trainers or TrainerHost()
        self.lines: dict[str, Learner] = {}
        self.episodes: dict[str, Learner] = {}
        # After a crash: learn one line per call up to this position (one episode per call).
        self.careful: dict[str, int] = {}
        self.careful_episodes: set[str] = set()
        self.crashes = 0  # times the learning process died
        self.dead_lettered = 0

    def open(
        self, session: Session, name: str, *, kind: LoopKind, arguments: str, now: float
    ) -> Learner:
        """(Re)build a bandit loop's learner from its checkpoint (`open_learner`)."""
        old = self.lines.pop(name, None)
        if old is not None:
            close(old)
        learner = open_learner(
            session, self.host, loop=name, kind=kind, arguments=arguments, source=self.source
        )
        learner.used_at = now
        learner.stream = self.stream
        self.lines[name] = learner
        return learner

    def learn(
        self, name: str, learner: Learner, items: list[tuple[int, str]], *, until: int, now: float
    ) -> bool:
        """Learn a loop's (position, line) items, then stand at position `until` (past the rows
        read but not learned too). False if the learning process died doing it: the caller
        then drops every learner (`lose_all`) and relearns from the checkpoints, carefully."""
        result = learn_in_turn(learner.trainer, items, self.careful.get(name, 0))
        for position, line, why in result.refused:
            self._dead_letter(name, position, line, why, now)
        if result.crashed:
            if result.poison is not None:
                self._dead_letter(name, *result.poison, now)
            else:
                log.error("the learning process died on a batch of %s; retrying line by line", name)
                self.careful[name] = result.careful_until
            return False
        learner.position = until
        if until >= self.careful.get(name, 0):
            self.careful.pop(name, None)
        return True

    def _dead_letter(self, name: str, position: int, line: str, reason: str, now: float) -> None:
        with self.sessions.begin() as session:
            store.dead_letter(
                session,
                source=self.source,
                loop=name,
                ref=position,
                record=line,
                reason=reason,
                now=now,
            )
        self.dead_lettered += 1
        log.warning("loop %s: joined row %s moved to dead_letters (%s)", name, position, reason)

    def train_episodes(self, name: str, *, now: float) -> Trained:
        """An RL loop's `train_episodes` in a transaction of its own. After the learning process
        died on the loop's episodes: one episode, and if the process dies on it too, that
        episode is dead-lettered (episodes.poison_episode)."""
        careful = name in self.careful_episodes
        try:
            with self.sessions.begin() as session:
                loop = session.get(Loop, name)
                if loop is None:
                    return Trained(None, None)
                learner, model = train_episodes(
                    session,
                    loop,
                    self.episodes.get(name),
                    host=self.host,
                    now=now,
                    limit=1 if careful else 1000,
                    fleet=self.fleet,
                )
        except NativeCrash as exc:
            if careful:
                with self.sessions.begin() as session:
                    reason = f"native crash while learning the episode: {exc}"
                    episodes.poison_episode(session, loop=name, reason=reason, now=now)
                self.dead_lettered += 1  # the episode it died on twice
            self.careful_episodes.add(name)
            return Trained(None, None, crashed=True)
        if learner is not None:
            self.episodes[name] = learner
        if model is None:
            self.careful_episodes.discard(name)
        return Trained(learner, model)

    def drop(self, name: str) -> None:
        """Forget the loop's learners (its checkpoint has what is kept)."""
        for learners in (self.lines, self.episodes):
            learner = learners.pop(name, None)
            if learner is not None:
                close(learner)

    def forget(self, name: str) -> None:
        """The loop is gone: forget everything about it."""
        self.drop(name)
        self.careful.pop(name, None)
        self.careful_episodes.discard(name)

    def drop_all(self) -> None:
        """Forget every learner: each rebuilds from its checkpoint when next needed."""
        for name in set(self.lines) | set(self.episodes):
            self.drop(name)

    def lose_all(self) -> None:
        """The learning process died: every trainer in it is gone."""
        self.crashes += 1
        self.lines.clear()
        self.episodes.clear()

    def close(self) -> None:
        """Stop the learning process."""
        self.host.close()
