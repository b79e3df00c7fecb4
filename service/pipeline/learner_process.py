"""`dloop up`'s learner in a process of its own: the embedded worker (ingest the local log, join,
learn, publish) runs beside the serving process instead of in it, so it never takes the
interpreter lock from the thread that answers rank (as a thread it took about half of it under
load: benchmarks/).

The two processes share the database and the log directory, and talk through a pipe:
- serving -> learner: `reload` (loops the API created, changed or deleted: the learner reads
  them from the database), `reset` (a model import, reset or retrain, answered when done),
  `stop`;
- learner -> serving: `changed` (loops whose served model or fallback it changed: serving reads
  them from the database, where they were committed first), `status` (what /readyz and
  /metrics report), `done` (a reset's answer).
If the learner process dies, serving starts another (its state is in the database).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.pipeline.background import configure_logging
from service.pipeline.embedded import EmbeddedWorker, LoopHealth
from service.pipeline.runtime import Registry

log = logging.getLogger("dloop.worker")

STATUS_EVERY = 0.25  # seconds between the learner's status reports
LEARNER_NICE = 10


@dataclass(frozen=True)
class LearnerConfig:
    """What the learner process is built from (picklable)."""

    database_url: str
    log_dir: str
    model_dir: str
    log_level: str
    tick: float
    batch_size: int
    max_dangling: int


class ResetFailed(RuntimeError):
    pass


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: str | None = None


class LearnerProcess:
    """The serving process's handle on the learner process: the embedded worker's interface as
    the API uses it (`reset`, health, `offset`), and, run in a background thread, the reader of
    what the learner reports."""

    def __init__(
        self,
        config: LearnerConfig,
        *,
        registry: Registry,
        sessions: sessionmaker[Session],
        restart_after: float = 1.0,
    ) -> None:
        self.config = config
        self.registry = registry
        self.sessions = sessions
        self.restart_after = restart_after
        self.offset = 0
        self.passed_at = time.monotonic()
        self.failing: dict[str, LoopHealth] = {}
        self.crashes = 0
        self.dead_lettered = 0
        self.restarts = 0
        self.started = False
        self.running = False
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._ids = iter(range(1, 1 << 62))
        self._conn: Connection | None = None
        self._process: Any = None
        registry.configured = self.reload

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the learner process (`run` then reads what it reports)."""
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of a threaded one
        ours, theirs = ctx.Pipe()
        self._process = ctx.Process(
            target=learner_main, args=(theirs, self.config), name="dloop-learner"
        )
        self._process.start()
        theirs.close()
        self._conn = ours
        self.started = self.running = True
        self.passed_at = time.monotonic()

    def run(self) -> None:
        while not self._stop.is_set():
            self._read()
            self.running = False
            self._fail_waiters("the learner process stopped")
            if self._stop.is_set():
                break
            code = self._process.exitcode if self._process is not None else None
            log.error("the learner process ended (exit code %s); starting another", code)
            self._stop.wait(self.restart_after)
            if not self._stop.is_set():
                self.restarts += 1
                self._join(0.0)
                self.start()

    def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            try:
                self._handle(msg)
            except Exception:
                log.exception("could not apply the learner's report %r", msg[0])

    def _handle(self, msg: tuple[Any, ...]) -> None:
        what = msg[0]
        if what == "changed":
            with self.sessions() as session:
                self.registry.load(session, msg[1], quiet=True)
        elif what == "status":
            status = msg[1]
            self.offset = status["offset"]
            self.passed_at = status["passed_at"]
            self.failing = status["failing"]
            self.crashes = status["crashes"]
            self.dead_lettered = status["dead_lettered"]
        elif what == "done":
            waiter = self._waiters.pop(msg[1], None)
            if waiter is not None:
                waiter.result, waiter.error = msg[2], msg[3]
                waiter.done.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._send(("stop",))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self, timeout: float = 30.0) -> None:
        """Wait for the learner process to finish its last pass and exit (then stop it)."""
        self._stop.set()
        self._send(("stop",))
        self._join(timeout)

    def _join(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        process.join(timeout)
        if process.is_alive():
            log.warning("the learner process did not stop within %.0f s; killing it", timeout)
            process.kill()
            process.join(5)
        if self._conn is not None:
            self._conn.close()

    # ---- what the API asks -------------------------------------------------------------------

    def reload(self, names: list[str]) -> None:
        """Loops this process changed or reloaded: the learner reads them again."""
        self._send(("reload", names))

    def reset(self, name: str, *, model: bytes | None, retrain_since: float | None = None) -> str:
        """EmbeddedWorker.reset, in the learner process; returns the served model id once this
        process serves it."""
        waiter = _Waiter()
        ident = next(self._ids)
        self._waiters[ident] = waiter
        if not self._send(("reset", ident, name, model, retrain_since)):
            self._waiters.pop(ident, None)
            raise ResetFailed("the learner process is not running")
        if not waiter.done.wait(600):
            self._waiters.pop(ident, None)
            raise ResetFailed("the learner process did not answer within 600 s")
        if waiter.error is not None:
            raise ResetFailed(waiter.error)
        result: str = waiter.result
        return result

    def _send(self, msg: tuple[Any, ...]) -> bool:
        conn = self._conn
        if conn is None:
            return False
        with self._send_lock:
            try:
                conn.send(msg)
            except (OSError, ValueError):
                return False
        return True

    def _fail_waiters(self, why: str) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.error = why
            waiter.done.set()


# ---- the learner process ---------------------------------------------------------------------


def learner_main(conn: Connection, config: LearnerConfig) -> None:
    """The learner process: the embedded worker in its main thread, the serving process's
    messages read in another, and a status report every STATUS_EVERY seconds."""
    # Ctrl-C reaches the whole process group; the serving process decides when this one stops
    # (it died of KeyboardInterrupt with a traceback, and serving took it for a crash).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from service.storage.db import make_engine, make_sessionmaker
    from service.storage.log import LogReader

    configure_logging(config.log_level)
    _yield_to_serving()
    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        # Serving gone: the command thread sees it and stops the worker.
        with send_lock, contextlib.suppress(OSError, ValueError):
            conn.send(msg)

    engine = make_engine(config.database_url)
    sessions = make_sessionmaker(engine)
    registry = Registry(Path(config.model_dir))
    with sessions() as session:
        registry.load(session)
    registry.served = lambda names: send(("changed", names))
    worker = EmbeddedWorker(
        sessions=sessions,
        decision_log=LogReader(Path(config.log_dir)),  # type: ignore[arg-type]
        registry=registry,
        tick=config.tick,
        batch_size=config.batch_size,
        max_dangling=config.max_dangling,
    )
    commands = threading.Thread(
        target=_commands, args=(conn, worker, registry, sessions, send), daemon=True
    )
    commands.start()
    reporting = threading.Event()
    reporter = threading.Thread(
        target=_report, args=(worker, send, reporting), daemon=True, name="status"
    )
    reporter.start()
    try:
        worker.run()
    finally:
        reporting.set()
        reporter.join()
        _status(worker, send)
        engine.dispose()


def _yield_to_serving() -> None:
    """A lower CPU priority (nice 10, inherited by this process's threads and the VW learning
    processes it starts): on a busy machine serving gets about nine times the learner's share,
    and the learner still makes steady progress. SCHED_IDLE, tried first, starved it: under
    sustained load it published nothing for minutes."""
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, LEARNER_NICE)


def _commands(
    conn: Connection,
    worker: EmbeddedWorker,
    registry: Registry,
    sessions: sessionmaker[Session],
    send: Callable[[tuple[Any, ...]], None],
) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # serving is gone
        what = msg[0]
        if what == "stop":
            break
        try:
            if what == "reload":
                with sessions() as session:
                    registry.load(session, msg[1])
            elif what == "reset":
                _, ident, name, model, since = msg
                try:
                    send(
                        ("done", ident, worker.reset(name, model=model, retrain_since=since), None)
                    )
                except Exception as exc:
                    log.exception("resetting loop %s failed", name)
                    send(("done", ident, None, f"{type(exc).__name__}: {exc}"))
        except Exception:
            log.exception("the learner could not apply %r", what)
    worker.request_stop()


def _report(
    worker: EmbeddedWorker, send: Callable[[tuple[Any, ...]], None], stop: threading.Event
) -> None:
    while not stop.wait(STATUS_EVERY):
        _status(worker, send)


def _status(worker: EmbeddedWorker, send: Callable[[tuple[Any, ...]], None]) -> None:
    send(
        (
            "status",
            {
                "offset": worker.offset,
                "passed_at": worker.passed_at,
                "failing": dict(worker.failing),
                "crashes": worker.crashes,
                "dead_lettered": worker.dead_lettered,
            },
        )
    )
