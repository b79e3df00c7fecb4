"""What every background thread shares: the loop that runs one step until stopped and backs off
when a step fails, and a lower scheduling priority than the threads that serve requests; and
the logging of the production processes that run them."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable


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
    traceback: bool = True,
) -> None:
    """Call `step` until `stop` is set.

    A falsy result means nothing was waiting: sleep `idle` seconds before the next call (steps
    that block in a poll pass 0). A step that raises (a database or broker away) is logged, then
    `on_error` drops whatever state the failure may have spoiled, and the next call waits
    `backoff` seconds, doubling up to `max_backoff`; a successful step resets the wait. Nothing
    is committed by a failed step, so retrying it is safe; `traceback=False` logs expected
    outages in one line."""
    delay = backoff
    while not stop.is_set():
        try:
            busy = step()
        except Exception as exc:
            if traceback:
                logger.exception("%s failed; retrying in %.1f s", what, delay)
            else:
                logger.warning("%s paused (%s); retrying in %.1f s", what, exc, delay)
            if on_error is not None:
                on_error()
            stop.wait(delay)
            delay = min(delay * 2, max_backoff)
            continue
        delay = backoff
        if not busy and idle > 0:
            stop.wait(idle)
