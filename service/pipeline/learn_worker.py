"""`dloop learn`: consume the joined topic, train each loop's VW model, checkpoint and publish.

A loop's joined stream lives in one partition (keyed by loop), so a loop has one learner at a
time and learners scale out on partitions. Every tick (the smallest modelExportFrequency of the
loops, at least 1 s) the learner writes, in one database transaction, the model bytes of every
loop that learned something, with the stream position they include, and the partition offsets
it has consumed; then it commits the offsets to Kafka. Whenever the assignment changes or a step
fails on an outage, it drops every model it has not checkpointed, seeks to the stored offsets
(service.consumer) and rebuilds each loop from its checkpoint, skipping positions the model
already includes, so a crash, an outage or a rebalance neither loses nor double-learns an
event (a rebalance costs at most a tick of learning again). Serving replicas pick a new model
up from the database within about a second.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka.structs import OffsetAndMetadata
from sqlalchemy.orm import Session, sessionmaker

from learners.sandbox import RemoteTrainer, TrainerHost, learn_in_turn
from learners.vw import with_exploration
from service.core.joined import read_joined
from service.pipeline.background import is_transient, keep_running
from service.pipeline.consumer import StoredOffsets, offset_name
from service.pipeline.episodes import EpisodeLearner, train_in_turn
from service.storage import store
from service.storage.models import Loop, ModelCheckpoint

log = logging.getLogger("dloop.learn")


SOURCE = "learn-stream"  # the stream learner's dead letters (ref: the joined-stream position)


@dataclass
class StreamLearner:
    trainer: RemoteTrainer
    arguments: str
    pos: int
    model_id: str
    exported_examples: int
    skip: set[int] = field(default_factory=set)  # dead-lettered positions ahead


class LearnWorker:
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
        self.host = trainers or TrainerHost()
        self.learners: dict[str, StreamLearner] = {}
        self.rl_learners: dict[str, EpisodeLearner] = {}
        self.rl_careful: set[str] = set()
        # After the learning process died on a batch: learn one line per call up to this
        # position, so the line that kills it again is found and dead-lettered.
        self.careful: dict[str, int] = {}
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
        finally:
            self.consumer.close()
            self.host.close()

    def request_stop(self) -> None:
        self._stop.set()

    def run_once(self, poll_ms: int = 200) -> int:
        batch = self.source.poll(timeout_ms=poll_ms, max_records=self.batch_size)
        self.consistent = False
        count = 0
        by_key: dict[bytes, StreamLearner | None] = {}
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
                    if pos > learner.pos:
                        if learn and pos not in learner.skip:
                            lines.append((pos, line))
                        learner.pos = pos
                        count += 1
            self.offsets[tp] = messages[-1].offset + 1
        for name, lines in work.items():
            if not self._learn(name, lines):
                self.source.rewind()  # poll() has moved past what was not yet saved
                return count
        self.consistent = True
        if self.clock() - self.checkpointed_at >= self._tick():
            self.checkpoint()
        return count

    def _learn(self, name: str, lines: list[tuple[int, str]]) -> bool:
        """Learn a loop's lines of this poll (one per call where a crash happened before);
        False if the learning process died (every learner then restarts from its checkpoint)."""
        learner = self.learners[name]
        result = learn_in_turn(learner.trainer, lines, self.careful.get(name, 0))
        for pos, line, why in result.refused:
            self._dead_letter(name, pos, line, why)
        if result.crashed:
            if result.poison is not None:
                self._dead_letter(name, *result.poison)
            else:
                log.error("the learning process died on %s; retrying line by line", name)
                self.careful[name] = result.careful_until
            return False
        if name in self.careful and learner.pos >= self.careful[name]:
            del self.careful[name]
        return True

    def _dead_letter(self, name: str, pos: int, line: str, reason: str) -> None:
        with self.sessions.begin() as session:
            store.dead_letter(
                session,
                source=SOURCE,
                loop=name,
                ref=pos,
                record=line,
                reason=reason,
                now=self.clock(),
            )
        log.warning("loop %s: joined position %s moved to dead_letters (%s)", name, pos, reason)

    def _drop(self) -> None:
        """Forget everything not checkpointed: every learner rebuilds from its checkpoint, and
        the consumer goes back to the offsets stored with them (StoredOffsets.rewind)."""
        self.learners.clear()
        self.rl_learners.clear()
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

    def _learner(self, name: str) -> StreamLearner | None:
        learner = self.learners.get(name)
        if learner is not None and not learner.trainer.lost:
            return learner
        with self.sessions() as session:
            loop = session.get(Loop, name)
            if loop is None:
                return None  # deleted: its events are dropped
            if loop.kind == "rl":
                return None  # RL loops learn whole episodes from the database (train_rl)
            settings = store.loop_settings(loop)
            arguments = with_exploration(loop.policy["arguments"], settings.exploration)
            ckpt = store.get_checkpoint(session, loop=name)
            pos = ckpt.position if ckpt is not None else 0
            skip = store.poisoned(session, source=SOURCE, loop=name, after=pos)
        model = ckpt.model if ckpt is not None else None
        examples = ckpt.examples if ckpt is not None and model is not None else 0
        trainer = self.host.open(name, kind="cb", args=arguments, model=model, examples=examples)
        model_id = ckpt.model_id if ckpt is not None else "N/A"
        learner = StreamLearner(trainer, arguments, pos, model_id, trainer.examples, skip)
        self.learners[name] = learner
        return learner

    def checkpoint(self) -> None:
        """Save changed models and consumed offsets in one transaction, then commit the offsets
        to Kafka too (for monitoring: the offsets in the database are the ones resumed from)."""
        now = self.clock()
        self.checkpointed_at = now
        published: list[str] = []
        with self.sessions.begin() as session:
            for name, learner in list(self.learners.items()):
                ckpt = store.get_checkpoint(session, loop=name)
                if ckpt is not None and ckpt.model_id != learner.model_id:
                    # Reset, retrained or imported through the API: continue from that model.
                    self._adopt(session, name, learner, ckpt)
                if learner.trainer.examples == learner.exported_examples and ckpt is not None:
                    ckpt.position = learner.pos
                    continue
                model_id = uuid.uuid4().hex[:16]
                store.save_checkpoint(
                    session,
                    loop=name,
                    model_id=model_id,
                    model=learner.trainer.to_bytes(),
                    arguments=learner.arguments,
                    position=learner.pos,
                    examples=learner.trainer.examples,
                    now=now,
                )
                learner.model_id = model_id
                learner.exported_examples = learner.trainer.examples
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
        self.train_rl()

    def train_rl(self) -> None:
        """RL loops learn complete episodes from the database (learners.episodes); after the
        learning process died on a loop's episodes, one episode at a time, and the one that
        kills it again is dead-lettered."""
        with self.sessions() as session:
            names = [loop.name for loop in store.list_loops(session) if loop.kind == "rl"]
        for name in names:
            careful = name in self.rl_careful
            trained = train_in_turn(
                self.sessions,
                loop=name,
                learner=self.rl_learners.get(name),
                now=self.clock(),
                host=self.host,
                careful=careful,
            )
            if trained.crashed:
                self.learners.clear()
                self.rl_learners.clear()
                self.rl_careful.add(name)
                continue
            if trained.learner is None:
                continue
            self.rl_learners[name] = trained.learner
            if trained.model is not None:
                log.info("published an RL model for %s", name)
            else:
                self.rl_careful.discard(name)

    def _adopt(
        self, session: Session, name: str, learner: StreamLearner, ckpt: ModelCheckpoint
    ) -> None:
        """Switch to a model the API wrote, which covers the stream up to its position:
        learn the rows this learner had already consumed past that from the database, or
        skip ahead to it."""
        learner.arguments = ckpt.arguments
        examples = ckpt.examples if ckpt.model is not None else 0
        learner.trainer = self.host.open(
            name, kind="cb", args=ckpt.arguments, model=ckpt.model, examples=examples
        )
        learner.model_id = ckpt.model_id
        learner.exported_examples = learner.trainer.examples
        if learner.pos <= ckpt.position:
            learner.pos = ckpt.position
            return
        rows = store.joined_by_pos(session, loop=name, after=ckpt.position, until=learner.pos)
        lines = [r.line for r in rows if store.trainable(r) and (r.pos or 0) not in learner.skip]
        for _, reason in learner.trainer.learn_lines(lines):
            log.warning("loop %s: a joined row VW refused on adopting a model: %s", name, reason)
        ckpt.position = learner.pos
