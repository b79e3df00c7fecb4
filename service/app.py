"""create_app(settings) and its lifespan: build the state (storage, loops, the pipeline's worker
or publisher, the ranking processes), start the background threads, and at the end stop them and
close everything in reverse order. Also serve mode's watcher and replica directories."""

from __future__ import annotations

import fcntl
import gc
import itertools
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from learners.sandbox import InlineRankers, RankerPool
from service.api import errors, openapi
from service.api.middleware import NOSNIFF
from service.api.paths import PathStyles
from service.api.routes import (
    configuration,
    docs,
    evaluations,
    events,
    health,
    keys,
    local,
    logs,
    loops,
    model,
    multislot,
    stats,
    ui,
)
from service.api.state import Dloop
from service.core.files import private_dir
from service.core.kinds import CB
from service.core.ranks import rank_op
from service.core.settings import Settings, load_settings
from service.pipeline.background import configure_logging
from service.pipeline.embedded import EmbeddedWorker
from service.pipeline.learner_process import LearnerConfig, LearnerProcess
from service.pipeline.optimize import AutoOptimizer
from service.pipeline.publisher import LogPublisher
from service.pipeline.runtime import Registry
from service.pipeline.watcher import Watcher
from service.storage import kafka, store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.log import LocalLog


def _watcher(d: Dloop, *, every: float = 0.5, keys_only: bool = False) -> Watcher:
    return Watcher(
        sessions=d.sessions,
        url=d.engine.url,
        registry=d.registry,
        reload_keys=d.reload_keys,
        every=every,
        keys_only=keys_only,
    )


def claim_replica(root: Path) -> tuple[Path, int]:
    """Serve mode: the lowest-numbered `replica-N` directory under `root` that no running
    process holds, locked (flock) for as long as this process runs. Each serving process
    (uvicorn worker or separate replica sharing a data dir) keeps its durable Kafka buffer
    there, and a restarted process takes a free slot over and publishes what was left in it."""
    for i in itertools.count():
        path = private_dir(root / f"replica-{i}")
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        d, lock = await build_state(settings, clock, run_worker=run_worker)
        app.state.dloop = d
        threads = background(d, run_worker=run_worker)
        # Everything built so far (framework, SQLAlchemy, VW bindings) lives as long as the
        # process: keep it out of the cyclic collector, whose full passes over it paused serving
        # for 15-45 ms under load.
        gc.freeze()
        for _, thread in threads:
            thread.start()
        try:
            yield
        finally:
            stop(threads)
            await close(d, lock)

    app = App(
        title="dloop",
        summary="Self-hosted online decision service, wire-compatible with Azure AI Personalizer",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    errors.install(app)
    routers = (
        events,
        multislot,
        configuration,
        evaluations,
        model,
        local,
        logs,
        loops,
        stats,
        keys,
        health,
        ui,
    )
    for module in routers:
        app.include_router(module.router)
    openapi.install(app, [route for module in routers for route in module.router.routes])
    if settings.docs:
        docs.install(app)
    app.front = PathStyles(app.framework, settings=settings)
    return app


# What the ranking processes do beyond VW's own work: a whole rank (service.core.ranks).
RANKING_OPS = {"rank": rank_op}

HEALTHY = (
    {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"15"),
            NOSNIFF,
        ],
    },
    {"type": "http.response.body", "body": b'{"status":"ok"}'},
)


class App(FastAPI):
    """The FastAPI app behind dloop's own front door: every HTTP request goes first through
    PathStyles (service.api.paths: path styles, keys, rate limits, nosniff and error counts, and
    rank, reward and activate answered there), and only what they pass on reaches the framework's
    middleware and routing. `GET /healthz` is answered before all of it. (Inside the framework's
    stack, its error, telemetry and body-limit layers and its route matching cost a /healthz
    about 4x what a bare Starlette app spends, and a rank about a third of its time: benchmarks/.)
    """

    front: ASGIApp

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)  # lifespan
            return
        if scope["path"] == "/healthz" and scope["method"] == "GET":
            await send(HEALTHY[0])
            await send(HEALTHY[1])
            return
        scope["app"] = self
        await self.front(scope, receive, send)


async def build_state(
    settings: Settings, clock: Callable[[], float], *, run_worker: bool = False
) -> tuple[Dloop, int | None]:
    """Every resource of the process, as the api state, and the lock of the replica directory
    it claimed (serve mode; None embedded), held until `close`. Embedded, with `run_worker`
    and the default settings, the learner runs in a process of its own, started here."""
    private_dir(settings.data_dir)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    home, lock = (settings.data_dir, None)
    if settings.kafka.bootstrap_servers is not None:
        home, lock = claim_replica(settings.data_dir)
    registry = load_loops(settings, sessions, home / "models", clock)
    decision_log = LocalLog(home / "log")
    worker, publisher = build_pipeline(
        settings, sessions, decision_log, registry, clock, run_worker=run_worker
    )
    sandbox = settings.sandbox
    rankers = (
        RankerPool(
            sandbox.rankers,
            timeout=sandbox.rank_timeout,
            wait=sandbox.wait_timeout,
            cache_models=sandbox.cached_models,
            ops=RANKING_OPS,
            depth=sandbox.depth,
        )
        if sandbox.rankers > 0
        else InlineRankers(sandbox.cached_models, ops=RANKING_OPS)
    )
    await rankers.start()
    d = Dloop(settings, engine, sessions, decision_log, registry, worker, rankers, clock, publisher)
    d.reload_keys()
    return d, lock


def load_loops(
    settings: Settings, sessions: sessionmaker[Session], model_dir: Path, clock: Callable[[], float]
) -> Registry:
    """The loops to serve, their served models written under `model_dir`; the default loop and
    the environment's admin key are made sure of first."""
    shutil.rmtree(model_dir, ignore_errors=True)  # files of the last run's models
    registry = Registry(model_dir)
    with sessions.begin() as session:
        store.ensure_loop(
            session,
            name=store.DEFAULT_LOOP,
            kind=CB.name,
            now=clock(),
            policy=settings.default_policy,
        )
        if settings.api_key is not None:
            store.install_env_key(session, key=settings.api_key.get_secret_value(), now=clock())
    with sessions() as session:
        registry.load(session)
    return registry


def build_pipeline(
    settings: Settings,
    sessions: sessionmaker[Session],
    decision_log: LocalLog,
    registry: Registry,
    clock: Callable[[], float],
    *,
    run_worker: bool = False,
) -> tuple[EmbeddedWorker | LearnerProcess | None, LogPublisher | None]:
    """Serve mode: the publisher that forwards the local log to Kafka. Embedded: the worker that
    ingests it, joins and learns; with `run_worker` and the default settings, in a process of
    its own, started here."""
    if settings.kafka.bootstrap_servers is not None:
        kafka.ensure_topics(settings)
        publisher = LogPublisher(
            decision_log=decision_log,
            make_producer=lambda: kafka.producer(settings),
            topic=kafka.events_topic(settings),
            offset_path=decision_log.directory / "published.offset",
        )
        return None, publisher
    if run_worker and settings.learner.separate_process:
        return learner_process(settings, sessions, decision_log, registry), None
    worker = EmbeddedWorker(
        sessions=sessions,
        decision_log=decision_log,
        registry=registry,
        clock=clock,
        tick=settings.learner.tick_seconds,
        batch_size=settings.learner.batch_size,
        max_dangling=settings.max_dangling,
    )
    return worker, None


def learner_process(
    settings: Settings,
    sessions: sessionmaker[Session],
    decision_log: LocalLog,
    registry: Registry,
) -> LearnerProcess:
    """The embedded learner as a process beside this one, started (its own served-model
    files in `learner-models`), reading `decision_log`'s directory."""
    config = LearnerConfig(
        database_url=settings.database_url,
        log_dir=str(decision_log.directory),
        model_dir=str(settings.data_dir / "learner-models"),
        log_level=settings.log_level,
        tick=settings.learner.tick_seconds,
        batch_size=settings.learner.batch_size,
        max_dangling=settings.max_dangling,
    )
    shutil.rmtree(config.model_dir, ignore_errors=True)
    process = LearnerProcess(config, registry=registry, sessions=sessions)
    process.start()
    return process


class Stoppable(Protocol):
    def run(self) -> None: ...
    def request_stop(self) -> None: ...


def background(d: Dloop, *, run_worker: bool) -> list[tuple[Stoppable, threading.Thread]]:
    """The background threads (not started) and what each runs: serve mode the publisher and
    the watcher; embedded the worker and a keys-only watcher (unless `run_worker` is False);
    auto-optimisation unless `run_worker` is False."""
    stoppables: list[Stoppable] = []
    if d.publisher is not None:
        stoppables += [d.publisher, _watcher(d)]
    elif run_worker and d.worker is not None:
        stoppables += [d.worker, _watcher(d, every=1.0, keys_only=True)]
    if run_worker:
        stoppables.append(AutoOptimizer(d.control))
    return [(s, threading.Thread(target=s.run, daemon=True)) for s in stoppables]


def stop(threads: list[tuple[Stoppable, threading.Thread]]) -> None:
    """Ask every background thread to stop, and wait for them at most 30 s in all."""
    for s, _ in threads:
        s.request_stop()
    deadline = time.monotonic() + 30  # a bounded shutdown, however many loops
    for _, thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            errors.log.warning("%s did not stop within 30 s; leaving it", thread.name)


async def close(d: Dloop, lock: int | None) -> None:
    """Close the resources `build_state` made, in the reverse order."""
    d.jobs.close()
    if d.worker is not None:
        d.worker.close()
    await d.rankers.close()
    d.log.close()
    d.engine.dispose()
    if lock is not None:
        os.close(lock)
