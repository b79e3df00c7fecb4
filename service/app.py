"""create_app(settings) and the lifespan that builds and closes every resource."""

from __future__ import annotations

import fcntl
import gc
import itertools
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from learners.worker import EmbeddedWorker
from service import errors, kafka, openapi, store
from service.background import configure_logging
from service.context import Dloop
from service.db import make_engine, make_sessionmaker
from service.evaluations import AutoOptimizer
from service.log import LocalLog
from service.publisher import LogPublisher
from service.routes import (
    configuration,
    evaluations,
    events,
    health,
    logs,
    loops,
    model,
    multislot,
)
from service.runtime import Registry
from service.settings import Settings, load_settings

# /personalizer/v1.0/..., /personalizer/v1.1-preview.N/..., /personalizer/...?api-version=,
# each optionally under /loops/{loop}: all served by the routes at /personalizer/...
_PATH = re.compile(r"^(?:/loops/([^/]+))?/personalizer(?:/(v1\.0|v1\.1-preview\.[0-9]+))?(/.*)?$")
_BIG_BODY = re.compile(r"/model/?$")
_HOT = re.compile(r"^/personalizer/(?:(rank)|events/([^/]+)/(reward|activate))$")
_HOT_HANDLERS = {"rank": events.rank, "reward": events.reward, "activate": events.activate}


class PathStyles:
    """Rewrite every supported path style to one route table, remembering the loop; reject
    oversized bodies before they are read; answer rank, reward and activate directly.

    The hot path skips the framework's middleware and routing layers (about 40 us of a rank's
    130 us in-process, measured with the same handlers): the handlers are the ones the router
    also serves, and errors get the same Personalizer body as everywhere else.
    """

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            m = _PATH.match(scope["path"])
            if m:
                scope = dict(scope)
                scope["path"] = "/personalizer" + (m.group(3) or "")
                scope["dloop.loop"] = m.group(1) or store.DEFAULT_LOOP
                scope["dloop.version"] = m.group(2)
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if (
                length is not None
                and length.isdigit()
                and int(length) > self.max_body
                and not _BIG_BODY.search(scope["path"])
            ):
                response = errors.error_response(
                    413, "PayloadSizeExceeded", f"request body exceeds {self.max_body} bytes"
                )
                await response(scope, receive, send)
                return
            if scope["method"] == "POST" and (hot := _HOT.match(scope["path"])):
                await self._hot(hot, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _hot(self, hot: re.Match[str], scope: Scope, receive: Receive, send: Send) -> None:
        if hot.group(2) is not None:
            scope["path_params"] = {"event_id": hot.group(2)}
        try:
            response = await _HOT_HANDLERS[hot.group(1) or hot.group(3)](Request(scope, receive))
        except errors.ApiError as exc:
            response = errors.error_response(exc.status, exc.code, exc.message)
        except Exception:
            errors.log.exception("unhandled error")
            response = errors.error_response(500, "InternalServerError", "internal error")
        await response(scope, receive, send)


class Watcher:
    """Serve mode: reload loops, keys and models that other processes changed.

    On Postgres it LISTENs for the learners' notifications and reloads as soon as a model is
    published; every `every` seconds it reloads anyway (configuration and key changes made
    through other replicas, and any notification lost while the connection was down).
    """

    def __init__(self, d: Dloop, every: float = 0.5) -> None:
        self.d = d
        self.every = every
        self._stop = threading.Event()

    def run(self) -> None:
        listener: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if listener is None or listener.closed:
                    listener = self._listen()
                if listener is not None:
                    for _ in listener.notifies(timeout=self.every, stop_after=1):
                        pass
                else:
                    self._stop.wait(self.every)
                with self.d.sessions() as session:
                    self.d.registry.load(session)
                self.d.reload_keys()
            except Exception:
                errors.log.exception("reloading from the database failed; retrying")
                if listener is not None:
                    listener.close()
                listener = None
                self._stop.wait(self.every * 4)
        if listener is not None:
            listener.close()

    def _listen(self) -> psycopg.Connection[Any] | None:
        url = self.d.engine.url
        if url.get_backend_name() != "postgresql":
            return None
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute(f"LISTEN {store.CHANGES_CHANNEL}")
        return conn

    def request_stop(self) -> None:
        self._stop.set()


def claim_replica(root: Path) -> tuple[Path, int]:
    """Serve mode: the lowest-numbered `replica-N` directory under `root` that no running
    process holds, locked (flock) for as long as this process runs. Each serving process
    (uvicorn worker or separate replica sharing a data dir) keeps its durable Kafka buffer
    there, and a restarted process takes a free slot over and publishes what was left in it."""
    for i in itertools.count():
        path = root / f"replica-{i}"
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return path, fd
    raise AssertionError("unreachable")


def from_environment() -> FastAPI:
    """App factory for `dloop serve --workers N` (each uvicorn worker process builds its own)."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    run_worker: bool = True,
) -> FastAPI:
    """The HTTP app. The database must already be migrated (`dloop migrate` / `dloop up`).

    Embedded (no Kafka configured): a worker thread ingests the local log, joins and learns;
    tests pass `run_worker=False` and drive `app.state.dloop.worker.run_once()` themselves.
    Serve (DLOOP_KAFKA__BOOTSTRAP_SERVERS set): the local log is forwarded to Kafka by a
    publisher thread, `dloop join` and `dloop learn` do the rest, and a watcher thread picks up
    configuration, key and model changes from the database.
    """
    serve = settings.kafka.bootstrap_servers is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        sessions = make_sessionmaker(engine)
        registry = Registry()
        with sessions.begin() as session:
            store.ensure_loop(session, name=store.DEFAULT_LOOP, kind="cb", now=clock())
            if settings.api_key is not None:
                store.add_key(
                    session,
                    key=settings.api_key.get_secret_value(),
                    role="admin",
                    loop=None,
                    now=clock(),
                )
        with sessions() as session:
            registry.load(session)
        lock = None
        log_dir = settings.data_dir / "log"
        if serve:
            replica_dir, lock = claim_replica(settings.data_dir)
            log_dir = replica_dir / "log"
        decision_log = LocalLog(log_dir)
        worker = publisher = None
        stoppables: list[Any] = []
        if serve:
            kafka.ensure_topics(settings)
            publisher = LogPublisher(
                decision_log=decision_log,
                make_producer=lambda: kafka.producer(settings),
                topic=kafka.events_topic(settings),
                offset_path=log_dir / "published.offset",
            )
        else:
            worker = EmbeddedWorker(
                sessions=sessions,
                decision_log=decision_log,
                registry=registry,
                clock=clock,
                tick=settings.learner.tick_seconds,
                batch_size=settings.learner.batch_size,
            )
        d = Dloop(settings, engine, sessions, decision_log, registry, worker, clock, publisher)
        d.reload_keys()
        app.state.dloop = d
        if publisher is not None:
            stoppables += [publisher, Watcher(d)]
        elif run_worker and worker is not None:
            stoppables.append(worker)
        if run_worker:
            stoppables.append(AutoOptimizer(d))
        # Everything built so far (framework, SQLAlchemy, VW bindings) lives as long as the
        # process: keep it out of the cyclic collector, whose full passes over it paused serving
        # for 15-45 ms under load.
        gc.freeze()
        threads = [threading.Thread(target=s.run, daemon=True) for s in stoppables]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            for s in stoppables:
                s.request_stop()
            for thread in threads:
                thread.join()
            d.jobs.close()
            decision_log.close()
            engine.dispose()
            if lock is not None:
                os.close(lock)

    app = FastAPI(
        title="dloop",
        summary="Self-hosted online decision service, wire-compatible with Azure AI Personalizer",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    errors.install(app)
    modules = (events, multislot, configuration, evaluations, model, logs, loops, health)
    for module in modules:
        app.include_router(module.router)
    openapi.install(app, [route for module in modules for route in module.router.routes])
    app.add_middleware(PathStyles, max_body=settings.max_body_bytes)
    return app
