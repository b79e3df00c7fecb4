"""The embedded worker: one thread that ingests the local decision log, joins rewards, trains
each loop's model and publishes it for ranking every modelExportFrequency.

Crash safety: the log offset is committed with the rows it produced; a model checkpoint stores
the trainer's bytes with the last joined seq they include, so a restart re-learns exactly the
joined events after the checkpoint (nothing lost, nothing learned twice).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from learners.cb import CBTrainer
from learners.episodes import EpisodeLearner, train_episodes
from service import store
from service.background import keep_running, lower_thread_priority
from service.log import LocalLog, record_time
from service.models import Loop
from service.runtime import Registry

log = logging.getLogger("dloop.worker")

LOG_OFFSET = "local-log"
RETENTION_EVERY = 600.0


@dataclass
class LoopLearner:
    trainer: CBTrainer
    arguments: str
    learned_seq: int
    exported_examples: int
    exported_at: float


class EmbeddedWorker:
    """Join + learn + publish for every loop. `run_once` does one pass; `run` loops until
    `request_stop`. Thread-safe entry point for the API: `reset`."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        decision_log: LocalLog,
        registry: Registry,
        clock: Callable[[], float] = time.time,
        tick: float = 0.2,
        batch_size: int = 2000,
        max_dangling: int = store.MAX_DANGLING,
    ) -> None:
        self.sessions = sessions
        self.log = decision_log
        self.registry = registry
        self.clock = clock
        self.tick = tick
        self.batch_size = batch_size
        self.max_dangling = max_dangling
        self.learners: dict[str, LoopLearner] = {}
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.offset = 0
        self.retention_at = 0.0
        self.read_until = 0.0  # event time of the last record ingested
        self.rl_learners: dict[str, EpisodeLearner] = {}
        self.rl_trained_at: dict[str, float] = {}
        # Small ingestion transactions keep each GIL-holding stretch short.
        self.read_bytes = 1 << 20

    # ---- lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        lower_thread_priority()
        # The worker shares the GIL with the event loop that serves rank: with the default 5 ms
        # switch interval a request can wait that long for a batch of joins to yield. 0.5 ms
        # keeps rank latency flat (see benchmarks/) at a small cost in worker throughput.
        sys.setswitchinterval(0.0005)
        # A failed pass (a locked or restarting database) commits nothing: retry it later.
        keep_running(
            self._stop,
            self.run_once,
            what="worker pass",
            logger=log,
            idle=self.tick,
            backoff=self.tick,
            max_backoff=5.0,
        )
        self.run_once(final=True)

    def request_stop(self) -> None:
        self._stop.set()

    # ---- one pass ----------------------------------------------------------------------------

    def run_once(self, *, final: bool = False) -> bool:
        """Ingest, join, learn, maybe publish. Returns True if there may be more work right now."""
        with self._lock:
            busy = self._ingest()
            now = self.clock()
            if busy:
                # Behind on the log: judge reward windows by the last record read, so none
                # closes while its reward is still unread.
                now = min(now, self.read_until)
            for name, rt in list(self.registry.loops.items()):
                with self.sessions.begin() as session:
                    joined = store.join_due(
                        session,
                        loop=name,
                        rules=rt.settings.rules,
                        now=now,
                        limit=self.batch_size,
                        max_dangling=self.max_dangling,
                    )
                busy |= joined >= self.batch_size
                if rt.kind == "rl":
                    if final or now - self.rl_trained_at.get(name, 0.0) >= rt.settings.export_every:
                        busy |= self._train_episodes(name, now)
                    continue
                busy |= self._learn(name)
                learner = self.learners[name]
                if final or now - learner.exported_at >= rt.settings.export_every:
                    self._export(name, now)
            if now - self.retention_at >= RETENTION_EVERY:
                self._retention(now)
            return busy

    def _retention(self, now: float) -> None:
        """Drop logged events older than each loop's logRetentionDays (-1 keeps them)."""
        self.retention_at = now
        for name, rt in list(self.registry.loops.items()):
            days = rt.settings.retention_days
            if days >= 0:
                with self.sessions.begin() as session:
                    store.apply_retention(session, loop=name, before=now - days * 86400)

    def _ingest(self) -> bool:
        with self.sessions.begin() as session:
            offset = store.get_offset(session, name=LOG_OFFSET)
            records, new_offset = self.log.read(offset, max_bytes=self.read_bytes)
            if not records:
                return False
            dead = store.ingest(
                session, records=[r for r in records if r], source=LOG_OFFSET, now=self.clock()
            )
            if dead:
                log.warning("%d unreadable log records moved to dead_letters", dead)
            store.set_offset(session, name=LOG_OFFSET, offset=new_offset)
        self.offset = new_offset
        self.log.release(new_offset)
        self.read_until = record_time(records[-1])
        return new_offset < self.log.end()

    def _learner(self, name: str) -> LoopLearner:
        learner = self.learners.get(name)
        rt = self.registry.loops[name]
        if learner is not None and learner.arguments == rt.arguments:
            return learner
        with self.sessions() as session:
            ckpt = store.get_checkpoint(session, loop=name)
        if ckpt is not None and ckpt.model is not None and ckpt.arguments == rt.arguments:
            trainer = CBTrainer(rt.arguments, ckpt.model, ckpt.examples)
            learner = LoopLearner(trainer, rt.arguments, ckpt.learned_seq, ckpt.examples, 0.0)
        else:
            seq = ckpt.learned_seq if ckpt is not None else 0
            learner = LoopLearner(CBTrainer(rt.arguments), rt.arguments, seq, 0, 0.0)
        self.learners[name] = learner
        return learner

    def _learn(self, name: str) -> bool:
        learner = self._learner(name)
        with self.sessions() as session:
            rows = store.joined_after(
                session, loop=name, seq=learner.learned_seq, limit=self.batch_size
            )
        for row in rows:
            if store.trainable(row):
                learner.trainer.learn(row.line.encode())
            learner.learned_seq = row.seq
        return len(rows) >= self.batch_size

    def _train_episodes(self, name: str, now: float) -> bool:
        """RL loops: learn complete episodes and publish the model (learners.episodes)."""
        self.rl_trained_at[name] = now
        rt = self.registry.loops[name]
        with self.sessions.begin() as session:
            loop = session.get(Loop, name)
            if loop is None:
                return False
            learner, model = train_episodes(
                session, loop, self.rl_learners.get(name), arguments=rt.arguments, now=now
            )
        self.rl_learners[name] = learner
        if model is None:
            return False
        self.registry.publish(name, model, learner.model_id)
        self.rl_trained_at[name] = 0.0  # more may be waiting: look again at once
        return True

    def _export(self, name: str, now: float) -> None:
        learner = self.learners[name]
        learner.exported_at = now
        if learner.trainer.examples == learner.exported_examples:
            with self.sessions.begin() as session:
                ckpt = store.get_checkpoint(session, loop=name)
                if ckpt is not None and ckpt.learned_seq != learner.learned_seq:
                    ckpt.learned_seq = learner.learned_seq
            return
        model = learner.trainer.to_bytes()
        model_id = uuid.uuid4().hex[:16]
        with self.sessions.begin() as session:
            store.save_checkpoint(
                session,
                loop=name,
                model_id=model_id,
                model=model,
                arguments=learner.arguments,
                learned_seq=learner.learned_seq,
                examples=learner.trainer.examples,
                now=now,
            )
        learner.exported_examples = learner.trainer.examples
        self.registry.publish(name, model, model_id)

    # ---- commands from the API ---------------------------------------------------------------

    def reset(
        self,
        name: str,
        *,
        model: bytes | None,
        retrain_since: float | None = None,
    ) -> str:
        """Replace `name`'s model with `model` (None: blank, ranking uniform until the next
        export) from the next joined event on; with `retrain_since`, train the blank model on
        the joined events created since then first. Returns the served model id."""
        with self._lock:
            now = self.clock()
            rt = self.registry.loops[name]
            with self.sessions.begin() as session:
                model_id, seq = store.reset_checkpoint(
                    session, loop=name, model=model, arguments=rt.arguments, now=now
                )
                if rt.kind == "rl" and retrain_since is not None and model is None:
                    store.unlearn_episodes(session, loop=name, since=retrain_since)
            self.learners.pop(name, None)
            self.registry.publish(name, model, model_id)
            if rt.kind == "rl":
                self.rl_trained_at.pop(name, None)  # retrain (if asked) on the next pass
                return model_id
            if retrain_since is not None and model is None:
                learner = self._learner(name)
                with self.sessions() as session:
                    rows = store.joined_between(
                        session, loop=name, since=retrain_since, until_seq=seq
                    )
                for row in rows:
                    if store.trainable(row):
                        learner.trainer.learn(row.line.encode())
                if learner.trainer.examples:
                    self._export(name, now)
                    model_id = self.registry.loops[name].model_id
            return model_id
