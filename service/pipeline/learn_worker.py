"""`dloop learn`: consume the joined topic, train each loop's VW model, checkpoint and publish.

A loop's joined stream lives in one partition (keyed by loop), so a loop has one learner at a
time and learners scale out on partitions. Every tick (the smallest modelExportFrequency of the
loops, at least 1 s) the learner writes, in one database transaction, the model bytes of every
loop that learned something, with the stream position they include, and the partition offsets
it has consumed; then it commits the offsets to Kafka. Whenever the assignment changes or a step
fails on an outage, it drops every model it has not checkpointed, seeks to the stored offsets
(service.pipeline.consumer) and rebuilds each loop from its checkpoint (service.pipeline.
learning: the embedded worker's learner, which continues a model only if it was trained with
the loop's policy), skipping positions the model already includes, so a crash, an outage or a
rebalance neither loses nor double-learns an event (a rebalance costs at most a tick of
learning again). Serving replicas pick a new model up from the database within about a second.
RL loops learn whole episodes from the database every tick instead (service.pipeline.episodes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka.structs import OffsetAndMetadata
from sqlalchemy.orm import Session, sessionmaker

from learners.policy import with_exploration
from learners.sandbox import TrainerHost
from service.core.joined import read_joined
from service.core.kinds import loop_kind
from service.pipeline import learning
from service.pipeline.background import is_transient, keep_running
from service.pipeline.consumer import StoredOffsets, offset_name
from service.pipeline.learning import Learner, Learners
from service.storage import store
from service.storage.models import Loop, ModelCheckpoint

log = logging.getLogger("dloop.learn")


SOURCE = "learn-stream"  # the stream learner's dead letters (ref: the joined-stream position)


class LearnWorker:
    """Learn the joined topic's bandit loops and the database's RL episodes. `run_once` does one
    poll (and, every tick, `checkpoint` and `train_episodes`); `run` loops until
    `request_stop`."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        consumer: Any,
        joined_topic: str,
        clock: Callable[[], float] = time.time,
        batch_size: int = 2000,
        trainers: TrainerHost | None = None,
    ) -> None:
        self.sessions = sessions
        self.consumer = consumer
        self.clock = clock
        self.batch_size = batch_size
        self.learning = Learners(
            sessions, source=SOURCE, stream="pos", trainers=trainers, fleet=True
        )
        self.offsets: dict[Any, int] = {}
        self.checkpointed_at = 0.0
        self._tick_read_at = 0.0
        self._tick_value = 0.0
        self._stop = threading.Event()
        # False from a poll until the step that made it is done: only then do the learners'
        # models and `offsets` agree, and only then may they be checkpointed.
        self.consistent = True
        self.source = StoredOffsets(
            consumer, sessions, kind="learn", topic=joined_topic, drop=self._drop
        )

    @property
    def learners(self) -> dict[str, Learner]:
        """The bandit loops' learners, by loop."""
        return self.learning.lines

    @property
    def host(self) -> TrainerHost:
        return self.learning.host

    def run(self) -> None:
        """Until stopped; an outage rewinds and retries, a bug raises (service.background)."""
        try:
            keep_running(
                self._stop,
                self.run_once,
                what="learn pass",
                logger=log,
                recover=self.source.rewind,  # every learner rebuilds from its checkpoint
                transient=is_transient,
            )
            if self.consistent:
                self.checkpoint()
                self.train_episodes()
        finally:
            self.consumer.close()
            self.learning.close()

    def request_stop(self) -> None:
        self._stop.set()

    def run_once(self, poll_ms: int = 200) -> int:
        """One poll learned; returns how many joined rows it held past the learners' positions."""
        batch = self.source.poll(timeout_ms=poll_ms, max_records=self.batch_size)
        self.consistent = False
        work, count = self._read(batch)
        now = self.clock()
        for name, lines in work.items():
            learner = self.learning.lines[name]
            if not self.learning.learn(name, learner, lines, until=learner.position, now=now):
                self.learning.lose_all()
                self.source.rewind()  # poll() has moved past what was not yet saved
                return count
        self.consistent = True
        if self.clock() - self.checkpointed_at >= self._tick():
            self.checkpoint()
            self.train_episodes()
        return count

    def _read(self, batch: dict[Any, list[Any]]) -> tuple[dict[str, list[tuple[int, str]]], int]:
        """A poll's (position, line) items to learn by loop, past each learner's position
        (which moves to the last row read), and how many rows it held past them."""
        count = 0
        by_key: dict[bytes, Learner | None] = {}
        work: dict[str, list[tuple[int, str]]] = {}
        for tp, messages in batch.items():
            for message in messages:
                key = message.key
                if key not in by_key:
                    by_key[key] = self._learner(key.decode())
                learner = by_key[key]
                if learner is None:
                    continue
                lines = work.setdefault(key.decode(), [])
                for pos, learn, line in read_joined(message.value):
                    if pos > learner.position:
                        if learn and pos not in learner.skip:
                            lines.append((pos, line))
                        learner.position = pos
                        count += 1
            self.offsets[tp] = messages[-1].offset + 1
        return work, count

    def _drop(self) -> None:
        """Forget everything not checkpointed: every learner rebuilds from its checkpoint, and
        the consumer goes back to the offsets stored with them (StoredOffsets.rewind)."""
        self.learning.drop_all()
        self.offsets.clear()
        self.consistent = True

    def _tick(self) -> float:
        if self.clock() - self._tick_read_at < 10 and self._tick_value:
            return self._tick_value
        self._tick_read_at = self.clock()
        self._tick_value = self._read_tick()
        return self._tick_value

    def _read_tick(self) -> float:
        with self.sessions() as session:
            loops = store.list_loops(session)
            return max(
                1.0,
                min((store.loop_settings(loop).export_every for loop in loops), default=1.0),
            )

    def _learner(self, name: str) -> Learner | None:
        learner = self.learning.lines.get(name)
        if learner is not None and not learner.trainer.lost:
            return learner
        with self.sessions() as session:
            loop = session.get(Loop, name)
            if loop is None:
                return None  # deleted: its events are dropped
            kind = loop_kind(loop.kind)
            if kind.episodic:
                return None  # RL loops learn whole episodes from the database (train_episodes)
            settings = store.loop_settings(loop)
            arguments = with_exploration(loop.policy["arguments"], settings.exploration)
            return self.learning.open(
                session, name, kind=kind, arguments=arguments, now=self.clock()
            )

    def checkpoint(self) -> None:
        """Save the models that learned something, every learner's position and the consumed
        offsets in one transaction, then commit the offsets to Kafka too (for monitoring: the
        offsets in the database are the ones resumed from)."""
        now = self.clock()
        self.checkpointed_at = now
        published: list[str] = []
        with self.sessions.begin() as session:
            for name, learner in list(self.learning.lines.items()):
                if self._save(session, name, learner, now):
                    published.append(name)
            for tp, offset in self.offsets.items():
                store.set_offset(session, name=offset_name("learn", tp), offset=offset)
            if published:
                store.notify_models(session, published)
        if self.offsets:
            self.consumer.commit(
                {tp: OffsetAndMetadata(offset, None, -1) for tp, offset in self.offsets.items()}
            )
        if published:
            log.info("published models for %s", ", ".join(published))

    def _save(self, session: Session, name: str, learner: Learner, now: float) -> bool:
        """Checkpoint a loop's learner in the caller's transaction; True if a new model was
        saved."""
        ckpt = store.get_checkpoint(session, loop=name)
        if ckpt is None:
            # The position is stored with the offsets: a loop without a checkpoint gets one.
            learning.save(session, learner, loop=name, now=now)
            return True
        if ckpt.model_id != learner.model_id:
            # Reset, retrained or imported through the API: continue from that model.
            learner = self._adopt(session, name, learner, ckpt)
        return learning.checkpoint(session, learner, loop=name, now=now) is not None

    def _adopt(
        self, session: Session, name: str, learner: Learner, ckpt: ModelCheckpoint
    ) -> Learner:
        """Switch to a model the API wrote, which covers the stream up to its position: learn
        the rows this learner had already consumed past that from the database, or skip ahead
        to it."""
        consumed = learner.position
        # The arguments are the checkpoint's: the API trained the model with them.
        adopted = self.learning.open(
            session, name, kind=learner.kind, arguments=ckpt.arguments, now=self.clock()
        )
        if consumed <= adopted.position:
            return adopted
        rows = store.joined_by_pos(session, loop=name, after=adopted.position, until=consumed)
        loop = session.get(Loop, name)
        rules = store.loop_settings(loop).rules.rewards if loop is not None else None
        lines = [
            learning.labelled(r, rules) if rules is not None else r.line
            for r in rows
            if store.trainable(r) and (r.pos or 0) not in adopted.skip
        ]
        for _, reason in adopted.trainer.learn_lines(lines):
            log.warning("loop %s: a joined row VW refused on adopting a model: %s", name, reason)
        adopted.position = consumed
        return adopted

    def train_episodes(self) -> None:
        """RL loops learn complete episodes from the database (service.pipeline.episodes); after
        the learning process died on a loop's episodes, one episode at a time, and the one that
        kills it again is dead-lettered."""
        with self.sessions() as session:
            names = [
                loop.name for loop in store.list_loops(session) if loop_kind(loop.kind).episodic
            ]
        for name in names:
            trained = self.learning.train_episodes(name, now=self.clock())
            if trained.crashed:
                self.learning.lose_all()
            elif trained.model is not None:
                log.info("published an RL model for %s", name)
