"""What every background thread shares: the loop that runs one step until stopped and recovers
when a step fails, a lower scheduling priority than the threads that serve requests, and the
logging of the production processes that run them.

Errors follow one taxonomy in every worker (`dloop join` and `dloop learn` on Kafka, the
embedded worker of `dloop up`, the log publisher of `dloop serve`):
1. An unreadable record (it does not parse, VW refuses it or crashes on it) is the step's own
   business: it goes to dead_letters with its reason and the step moves on. It is never raised
   out of a step, so it can never stop a worker or be retried forever.
2. A transient outage (`is_transient`: the database or the broker away or restarting, a commit
   refused by a rebalance) abandons the step: the worker goes back to its last durable state
   (`recover`; a Kafka consumer drops what it built since and seeks back to the offsets stored
   in the database, service.consumer) and backs off, then carries on.
3. Anything else is a bug: logged with its traceback, the worker stops, and `dloop join` or
   `dloop learn` exits non-zero (the embedded learner stops and /readyz answers 503).
The embedded worker keeps issue-11 isolation on top: a loop whose work fails for a reason that
is not an outage is reported and backed off alone (/readyz `degraded`), like an unreadable
record, and the other loops go on. The log publisher reads only its own local log and retries
everything: while it cannot publish, the records wait in that log.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import kafka.errors as KafkaErrors
from sqlalchemy import exc as sa_exc

from learners.sandbox import NativeCrash


def configure_logging(level: str) -> None:
    """Log to stderr at `level` (DLOOP_LOG_LEVEL) in `dloop serve`, `join` and `learn`;
    kafka-python's connection and group messages show only at DEBUG."""
    level = level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("kafka").setLevel(logging.WARNING)


def lower_thread_priority() -> None:
    """Background work shares the serving process: on a busy machine ranking comes first,
    joining, learning and offline jobs catch up in the gaps (Linux gives each thread its own
    nice value)."""
    if hasattr(os, "setpriority"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def is_transient(exc: BaseException) -> bool:
    """An outage worth waiting out: the database or the broker away, restarting or busy (a
    dropped connection, a refused connect, a deadlock or serialisation failure, a pool or
    broker timeout), a commit refused because the group rebalanced, a learning process that
    died. Everything else (a bug, a constraint violation, bad configuration) is not."""
    for e in (exc, exc.__cause__):
        if isinstance(e, _TRANSIENT):
            return True
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, KafkaErrors.KafkaError) and e.retriable:
            return True
    return False


_TRANSIENT: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,  # psycopg: connection lost or refused, admin shutdown, deadlock
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection in time
    KafkaErrors.CommitFailedError,  # the group rebalanced: the stored offsets decide anyway
    KafkaErrors.RebalanceInProgressError,
    KafkaErrors.UnknownMemberIdError,
    KafkaErrors.IllegalGenerationError,
    ConnectionError,
    TimeoutError,
    NativeCrash,  # the learning process died: its trainers rebuild from their checkpoints
)


def keep_running(
    stop: threading.Event,
    step: Callable[[], object],
    *,
    what: str,
    logger: logging.Logger,
    idle: float = 0.0,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
    on_error: Callable[[], None] | None = None,
    recover: Callable[[], None] | None = None,
    transient: Callable[[BaseException], bool] | None = None,
    traceback: bool = True,
) -> None:
    """Call `step` until `stop` is set.

    A falsy result means nothing was waiting: sleep `idle` seconds before the next call (steps
    that block in a poll pass 0). A step that raises is abandoned:
    - if `transient` says the error is not an outage, it is a bug: it is logged with its
      traceback and raised, so the worker stops (and `dloop join`/`learn` exit non-zero for
      their supervisor to restart them, the logs saying why);
    - otherwise it is logged, `on_error` does bookkeeping at once (it must not fail), and
      before the next step `recover` puts the worker back at its last durable state (a Kafka
      consumer drops what it built since and seeks back to its stored offsets: poll() had
      moved past the records of the failed step; service.consumer). A `recover` that fails is
      retried the same way. The next call waits `backoff` seconds, doubling up to
      `max_backoff`; a successful step resets the wait. `traceback=False` logs expected
      outages in one line."""
    delay = backoff
    recovering = False
    while not stop.is_set():
        try:
            if recovering and recover is not None:
                recover()
            recovering = False
            busy = step()
        except Exception as exc:
            if transient is not None and not transient(exc):
                logger.exception("%s failed; stopping (not an outage: a bug to fix)", what)
                raise
            if traceback:
                logger.exception("%s failed; retrying in %.1f s", what, delay)
            else:
                logger.warning("%s paused (%s); retrying in %.1f s", what, exc, delay)
            if on_error is not None:
                on_error()
            recovering = True
            stop.wait(delay)
            delay = min(delay * 2, max_backoff)
            continue
        delay = backoff
        if not busy and idle > 0:
            stop.wait(idle)
