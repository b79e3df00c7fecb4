"""Serve mode: keep this process's loops, models and keys current with what other processes
(learners, other replicas, `dloop keys`) changed in the database."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from service.pipeline.runtime import Registry
from service.storage import store

log = logging.getLogger("dloop.watcher")


class Watcher:
    """Serve mode: reload loops, keys and models that other processes changed.

    On Postgres it LISTENs for the learners' notifications and reloads as soon as a model is
    published; every `every` seconds it reloads anyway (configuration and key changes made
    through other replicas, and any notification lost while the connection was down).
    Embedded mode (`keys_only`): only keys, which `dloop keys` may change beside a running
    `dloop up`; the worker owns loops and models there.
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        url: URL,
        registry: Registry,
        reload_keys: Callable[[], None],
        every: float = 0.5,
        keys_only: bool = False,
    ) -> None:
        self.sessions = sessions
        self.url = url
        self.registry = registry
        self.reload_keys = reload_keys
        self.every = every
        self.keys_only = keys_only
        self._stop = threading.Event()

    def run(self) -> None:
        listener: psycopg.Connection[Any] | None = None
        full_at = 0.0
        while not self._stop.is_set():
            try:
                if not self.keys_only and (listener is None or listener.closed):
                    listener = self._listen()
                changed: set[str] = set()
                if listener is not None:
                    for note in listener.notifies(timeout=self.every, stop_after=1):
                        changed.update(n for n in note.payload.split(",") if n)
                else:
                    self._stop.wait(self.every)
                if not self.keys_only:
                    with self.sessions() as session:
                        # The loops named in notifications at once; all of them now and then
                        # (changes whose notification was lost while the connection was down).
                        if time.monotonic() - full_at >= self.every * 10:
                            full_at = time.monotonic()
                            self.registry.load(session)
                        elif changed:
                            self.registry.load(session, changed)
                self.reload_keys()
            except Exception:
                log.exception("reloading from the database failed; retrying")
                if listener is not None:
                    listener.close()
                listener = None
                self._stop.wait(self.every * 4)
        if listener is not None:
            listener.close()

    def _listen(self) -> psycopg.Connection[Any] | None:
        url = self.url
        if url.get_backend_name() != "postgresql":
            return None
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute(f"LISTEN {store.CHANGES_CHANNEL}")
        return conn

    def request_stop(self) -> None:
        self._stop.set()
