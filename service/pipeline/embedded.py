"""The embedded worker: one thread that ingests the local decision log, joins rewards, trains
each loop's model and publishes it for ranking every modelExportFrequency.

Crash safety: the log offset is committed with the rows it produced; a model checkpoint stores
the trainer's bytes with the last joined seq they include (its position, service.pipeline.
learning), so a restart re-learns exactly the joined events after the checkpoint (nothing lost,
nothing learned twice).

Many loops: a pass visits only the loops with something to do (records just ingested, a reward
window closing, joined rows to learn, a model to export), so idle loops cost nothing; a loop's
trainer lives in the learning process while the loop is busy and is dropped after
`idle_evict` seconds without work (its model is in its checkpoint).

Poison: the trainers live in a sandbox child (learners.sandbox), so VW crashing on a record
kills that child, not the server; what a crash asks of the learners is service.pipeline.
learning.Learners'. A loop that fails for any other reason is reported (`failing`, shown on
/readyz and /metrics) and skipped for that pass: one loop's failure never stops another's
learning.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from learners.sandbox import NativeCrash, TrainerHost
from service.core import record
from service.pipeline import learning
from service.pipeline.background import is_transient, keep_running, lower_thread_priority
from service.pipeline.guardrails import check_loop
from service.pipeline.join import compact_stats, join_due
from service.pipeline.learning import Learner, Learners
from service.pipeline.runtime import LoopRuntime, Registry
from service.storage import store
from service.storage.log import LocalLog

log = logging.getLogger("dloop.worker")

LOG_OFFSET = "local-log"
RETENTION_EVERY = 600.0
SOURCE = "learn"  # the embedded learner's dead letters (ref: the joined seq)


@dataclass
class LoopHealth:
    """A loop whose last pass failed: since when, how often in a row, why, and when it is tried
    again (backing off: a loop that keeps failing, or keeps crashing the learning process and
    with it every loop's unsaved learning, costs the others little)."""

    since: float
    failures: int
    error: str
    retry_at: float


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
        idle_evict: float = 300.0,
        trainers: TrainerHost | None = None,
        max_dangling: int = store.MAX_DANGLING,
    ) -> None:
        self.sessions = sessions
        self.log = decision_log
        self.registry = registry
        self.clock = clock
        self.tick = tick
        self.batch_size = batch_size
        self.idle_evict = idle_evict
        self.max_dangling = max_dangling
        self.learning = Learners(sessions, source=SOURCE, stream="seq", trainers=trainers)
        self.rl_trained_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.offset = 0
        self.retention_at = 0.0
        self.read_until = 0.0  # event time of the last record ingested
        # Small ingestion transactions keep each GIL-holding stretch short.
        self.read_bytes = 1 << 20
        # Which loops have work: when join_due next may join something, joined rows not yet
        # learned, RL episodes to train; None until the first pass reads it from the database.
        self.due: dict[str, float] | None = None
        self.to_learn: set[str] = set()
        self.rl_due: set[str] = set()
        # Loops with pending observations (as of their last join), and loops whose
        # configuration changed (their reward wait, say): looked at on the next pass.
        self.pending: set[str] = set()
        self.poked: set[str] = set()
        if registry.configured is None:
            registry.configured = self.poke
        # Health, for /readyz and /metrics.
        self.failing: dict[str, LoopHealth] = {}
        self.passed_at = time.monotonic()  # the end of the last pass that completed
        self.started = False
        self.running = False

    @property
    def learners(self) -> dict[str, Learner]:
        """The bandit loops' learners, by loop."""
        return self.learning.lines

    @property
    def crashes(self) -> int:
        """Times the learning process died."""
        return self.learning.crashes

    @property
    def dead_lettered(self) -> int:
        return self.learning.dead_lettered

    # ---- lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        lower_thread_priority()
        # The worker shares the GIL with the event loop that serves rank: with the default 5 ms
        # switch interval a request can wait that long for a batch of joins to yield. 0.5 ms
        # keeps rank latency flat (see benchmarks/) at a small cost in worker throughput.
        sys.setswitchinterval(0.0005)
        self.started = self.running = True
        try:
            # A pass that failed on an outage (a locked or restarting database) is abandoned and
            # its learning forgotten (`_recover`); a bug stops the worker (/readyz then 503).
            keep_running(
                self._stop,
                self.run_once,
                what="worker pass",
                logger=log,
                idle=self.tick,
                backoff=self.tick,
                max_backoff=5.0,
                recover=self._recover,
                transient=is_transient,
            )
            self.run_once(final=True)
        finally:
            self.running = False
            self.learning.close()

    def request_stop(self) -> None:
        self._stop.set()

    def poke(self, names: list[str]) -> None:
        """Loops whose configuration changed: the next pass looks at them (a shorter reward
        wait may have closed windows already)."""
        self.poked.update(names)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop the learning process (`run` does it itself; this is for a worker driven by
        `run_once`, or one whose thread did not stop in time)."""
        if self._lock.acquire(timeout=5):
            try:
                self.learning.close()
            finally:
                self._lock.release()

    # ---- one pass ----------------------------------------------------------------------------

    def run_once(self, *, final: bool = False) -> bool:
        """Ingest, join, learn, maybe publish. Returns True if there may be more work right now."""
        with self._lock:
            if self.due is None:
                self._start()
            assert self.due is not None
            poked, self.poked = self.poked, set()
            for name in poked:
                self.due[name] = -math.inf
            busy = self._ingest()
            now = self.clock()
            if busy:
                # Behind on the log: judge reward windows by the last record read, so none
                # closes while its reward is still unread.
                now = min(now, self.read_until)
            for name in self._active(now, final):
                health = self.failing.get(name)
                if health is not None and health.retry_at > self.clock() and not final:
                    continue  # failing: tried again later
                rt = self.registry.get(name)
                if rt is None:  # deleted
                    self._forget(name)
                    continue
                try:
                    busy |= self._work(name, rt, now, final)
                except Exception as exc:
                    if is_transient(exc) and not isinstance(exc, NativeCrash):
                        raise  # the database is away: the whole pass is retried
                    self._fail(name, exc)  # this loop's problem (a crash included): backs off
                    continue
                self.failing.pop(name, None)
            self._evict(now)
            if now - self.retention_at >= RETENTION_EVERY:
                self._retention(now)
            self.passed_at = time.monotonic()
            return busy

    def _start(self) -> None:
        with self.sessions() as session:
            self.due = {name: -math.inf for name in store.loops_with_pending(session)}
            self.to_learn = store.loops_to_learn(session)
        self.rl_due = {name for name, rt in self.registry.loops.items() if rt.loop_kind.episodic}

    def _active(self, now: float, final: bool) -> set[str]:
        assert self.due is not None
        names = {name for name, at in self.due.items() if at <= now}
        names |= self.to_learn | self.rl_due
        for name, learner in self.learning.lines.items():
            rt = self.registry.get(name)
            export_every = rt.settings.export_every if rt is not None else 0.0
            if learner.unsaved and (final or now - learner.exported_at >= export_every):
                names.add(name)
        return names

    def _work(self, name: str, rt: LoopRuntime, now: float, final: bool) -> bool:
        assert self.due is not None
        busy = self._join(name, rt, now) if self.due.get(name, math.inf) <= now else False
        if rt.loop_kind.episodic:
            due = final or now - self.rl_trained_at.get(name, 0.0) >= rt.settings.export_every
            if name in self.rl_due and due:
                busy |= self._train_episodes(name, now)
            return busy
        if name in self.to_learn:
            busy |= self._learn(name, rt, now)
        learner = self.learning.lines.get(name)
        if learner is not None and (final or now - learner.exported_at >= rt.settings.export_every):
            self._export(name, learner, now)
        return busy

    def _join(self, name: str, rt: LoopRuntime, now: float) -> bool:
        """Join the loop's due decisions; True if more may be due right now."""
        assert self.due is not None
        with self.sessions.begin() as session:
            joined = join_due(
                session,
                loop=name,
                rules=rt.settings.rules,
                now=now,
                limit=self.batch_size,
                max_dangling=self.max_dangling,
                tracked=rt.settings.tracked,
            )
            flip = None
            if joined and (rt.settings.guardrails or rt.fallback):
                flip = check_loop(session, loop=name, guardrails=rt.settings.guardrails, now=now)
        if flip is not None:
            self.registry.set_fallback(name, flip)  # serving follows at once
        if joined:
            (self.rl_due if rt.loop_kind.episodic else self.to_learn).add(name)
        if joined >= self.batch_size:
            return True
        with self.sessions() as session:
            at, pending = store.next_join_at(session, loop=name, wait=rt.settings.rules.wait)
        if pending:
            self.pending.add(name)
        else:
            self.pending.discard(name)
        if at is None:
            self.due.pop(name, None)
        else:
            self.due[name] = at
        return False

    def _fail(self, name: str, exc: Exception) -> None:
        """The loop's work failed (not an outage): report it, back off, and forget what its
        trainer learned since its checkpoint (the failure may have come between learning rows
        and recording that they were learned)."""
        if isinstance(exc, NativeCrash):
            self._lost_trainers()
        if name in self.learning.lines:
            self.to_learn.add(name)
        if name in self.learning.episodes:
            self.rl_due.add(name)
        self.learning.drop(name)
        health = self.failing.get(name)
        message = f"{type(exc).__name__}: {exc}"[:500]
        now = self.clock()
        if health is None:
            health = self.failing[name] = LoopHealth(now, 0, message, now)
            log.exception("loop %s failed; other loops go on", name, exc_info=exc)
        health.failures += 1
        health.error = message
        health.retry_at = now + min(300.0, self.tick * 2**health.failures)

    def _forget(self, name: str) -> None:
        assert self.due is not None
        self.due.pop(name, None)
        self.to_learn.discard(name)
        self.rl_due.discard(name)
        self.pending.discard(name)
        self.failing.pop(name, None)
        self.learning.forget(name)

    def _recover(self) -> None:
        """After a pass failed on an outage: forget what was built in memory since the last
        durable point. Each trainer rebuilds from its checkpoint and learns again what followed
        (the pass may have failed between learning rows and recording that they were learned),
        and which loops have work is read again from the database."""
        with self._lock:
            self.learning.drop_all()
            self.due = None

    def _lost_trainers(self) -> None:
        """The learning process died: every trainer in it is gone. Each loop rebuilds from its
        checkpoint and learns again what followed."""
        self.to_learn |= set(self.learning.lines)
        self.rl_due |= set(self.learning.episodes)
        self.learning.lose_all()

    def _evict(self, now: float) -> None:
        for name, learner in list(self.learning.lines.items()):
            idle = (
                name not in self.to_learn
                and not learner.unsaved
                and now - learner.used_at >= self.idle_evict
            )
            if idle:
                self.learning.drop(name)

    def _retention(self, now: float) -> None:
        """Drop logged events older than each loop's logRetentionDays (-1 keeps them); keep
        rollups older than two days per hour (store.compact)."""
        self.retention_at = now
        by_days: dict[int, list[str]] = {}
        for name, rt in list(self.registry.loops.items()):
            if rt.settings.retention_days >= 0:
                by_days.setdefault(rt.settings.retention_days, []).append(name)
        for days, names in by_days.items():  # a few statements, however many loops
            with self.sessions.begin() as session:
                store.apply_retention(session, loops=names, before=now - days * 86400)
        compact_stats(self.sessions, now)

    def _ingest(self) -> bool:
        assert self.due is not None
        # Behind only if the log held more when the pass began than it read: what arrives
        # during the pass waits for the next tick. (Rushing to it made every pass a few dozen
        # records under steady load, and the pass's fixed cost most of the learner's CPU.)
        end = self.log.end()
        with self.sessions.begin() as session:
            offset = store.get_offset(session, name=LOG_OFFSET)
            records, new_offset = self.log.read(offset, max_bytes=self.read_bytes)
            if not records:
                return False
            result = store.ingest(
                session, records=[r for r in records if r], source=LOG_OFFSET, now=self.clock()
            )
            if result.dead:
                log.warning("%d unreadable log records moved to dead_letters", result.dead)
            store.set_offset(session, name=LOG_OFFSET, offset=new_offset)
        for name in result.loops:
            rt = self.registry.get(name)
            first = result.first_decision.get(name)
            if rt is None or first is None or name in result.observed or name in self.pending:
                # Look at once: an observation may complete a decision early, and a decision
                # may be the one a pending observation waits for.
                self.due[name] = -math.inf
            else:
                # Decisions alone: nothing to join before the first one's window closes.
                self.due[name] = min(self.due.get(name, math.inf), first + rt.settings.rules.wait)
            if rt is not None and rt.loop_kind.episodic:
                self.rl_due.add(name)
        self.offset = new_offset
        self.log.release(new_offset)
        self.read_until = record.time_of(records[-1])
        return new_offset < end

    # ---- learning ----------------------------------------------------------------------------

    def _learner(self, name: str, rt: LoopRuntime) -> Learner:
        learner = self.learning.lines.get(name)
        if learner is not None and learner.arguments == rt.arguments and not learner.trainer.lost:
            learner.used_at = self.clock()
            return learner
        with self.sessions() as session:
            return self.learning.open(
                session, name, kind=rt.loop_kind, arguments=rt.arguments, now=self.clock()
            )

    def _learn(self, name: str, rt: LoopRuntime, now: float) -> bool:
        """Learn the loop's next joined rows; True if more may be waiting."""
        learner = self._learner(name, rt)
        with self.sessions() as session:
            rows = store.joined_after(
                session, loop=name, seq=learner.position, limit=self.batch_size
            )
        if not rows:
            self.to_learn.discard(name)
            return False
        rules = rt.settings.rules.rewards
        items = [
            (row.seq, learning.labelled(row, rules))
            for row in rows
            if store.trainable(row) and row.seq not in learner.skip
        ]
        if not self._learn_items(name, learner, items, until=rows[-1].seq, now=now):
            return True
        more = len(rows) >= self.batch_size
        if not more:
            self.to_learn.discard(name)
        return more

    def _learn_items(
        self, name: str, learner: Learner, items: list[tuple[int, str]], *, until: int, now: float
    ) -> bool:
        """Learn (seq, line) items; False if the learning process died doing it (the loop
        then relearns from its checkpoint, carefully)."""
        if self.learning.learn(name, learner, items, until=until, now=now):
            return True
        self._lost_trainers()
        return False

    def _train_episodes(self, name: str, now: float) -> bool:
        """RL loops: learn complete episodes and publish the model (service.pipeline.episodes)."""
        self.rl_trained_at[name] = now
        trained = self.learning.train_episodes(name, now=now)
        if trained.crashed:
            self._lost_trainers()
            self.rl_trained_at[name] = 0.0
            return True
        if trained.learner is None:
            return False
        if trained.model is None:
            self.rl_due.discard(name)
            return False
        self.registry.publish(name, trained.model, trained.learner.model_id)
        self.rl_trained_at[name] = 0.0  # more may be waiting: look again at once
        return True

    def _export(self, name: str, learner: Learner, now: float) -> None:
        learner.exported_at = now
        if not learner.unsaved:
            return
        with self.sessions.begin() as session:
            model = learning.checkpoint(session, learner, loop=name, now=now)
        if model is not None:
            self.registry.publish(name, model, learner.model_id)

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
            retrain = retrain_since is not None and model is None
            with self.sessions.begin() as session:
                model_id, seq = store.reset_checkpoint(
                    session, loop=name, model=model, arguments=rt.arguments, now=now
                )
                if rt.loop_kind.episodic and retrain:
                    store.unlearn_episodes(session, loop=name, since=retrain_since)
            self.learning.drop(name)
            self.learning.careful.pop(name, None)
            self.registry.publish(name, model, model_id)
            if rt.loop_kind.episodic:
                self.rl_trained_at.pop(name, None)  # retrain (if asked) on the next pass
                self.rl_due.add(name)
                return model_id
            if retrain_since is not None and model is None:
                retrained = self._retrain(name, rt, since=retrain_since, until=seq, now=now)
                model_id = retrained or model_id
            return model_id

    def _retrain(
        self, name: str, rt: LoopRuntime, *, since: float, until: int, now: float
    ) -> str | None:
        """Train the blank model just reset on the joined events created since `since` (up to
        seq `until`) and publish it; returns its id (None: nothing was learned)."""
        learner = self._learner(name, rt)
        with self.sessions() as session:
            rows = store.joined_between(session, loop=name, since=since, until_seq=until)
        rules = rt.settings.rules.rewards
        items = [
            (r.seq, learning.labelled(r, rules))
            for r in rows
            if store.trainable(r) and r.seq not in learner.skip
        ]
        # After a crash: carefully, later.
        self._learn_items(name, learner, items, until=learner.position, now=now)
        if not learner.trainer.examples or learner.trainer.lost:
            return None
        self._export(name, learner, now)
        return self.registry.loops[name].model_id
