"""create_app(settings) and the lifespan that builds and closes every resource."""

from __future__ import annotations

import fcntl
import gc
import itertools
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from learners.sandbox import InlineRankers, RankerPool
from service.api import errors, openapi
from service.api.guard import (
    BodyTimeout,
    BodyTooLarge,
    RateLimiter,
    is_public,
    key_hash,
    limited_receive,
    scope_key,
)
from service.api.middleware import CountErrors, NoSniff
from service.api.routes import (
    configuration,
    docs,
    evaluations,
    events,
    health,
    keys,
    logs,
    loops,
    model,
    multislot,
)
from service.api.state import Dloop
from service.core.files import private_dir
from service.core.kinds import CB
from service.core.settings import Settings, load_settings
from service.pipeline.background import configure_logging
from service.pipeline.embedded import EmbeddedWorker
from service.pipeline.optimize import AutoOptimizer
from service.pipeline.publisher import LogPublisher
from service.pipeline.runtime import Registry
from service.storage import kafka, store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.log import LocalLog

# /personalizer/v1.0/..., /personalizer/v1.1-preview.N/..., /personalizer/...?api-version=,
# each optionally under /loops/{loop}: all served by the routes at /personalizer/...
# Matched whole (fullmatch, DOTALL): `$` also matches before a trailing newline, and `.` would
# stop at one, so "/personalizer/rank\n" was served as a rank.
_PATH = re.compile(
    r"(?:/loops/([^/]+))?/personalizer(?:/(v1\.0|v1\.1-preview\.[0-9]+))?(/.*)?", re.S
)
_HOT = re.compile(r"/personalizer/(?:(rank)|events/([^/]+)/(reward|activate))", re.S)
_HOT_HANDLERS = {"rank": events.rank, "reward": events.reward, "activate": events.activate}


class PathStyles:
    """Rewrite every supported path style to one route table, remembering the loop; guard every
    request (service.api.guard: a valid key before any body is read, the key's rate limit, a body
    counted as it arrives); answer rank, reward and activate directly.

    The hot path skips the framework's middleware and routing layers (about 40 us of a rank's
    130 us in-process, measured with the same handlers): the handlers are the ones the router
    also serves, and errors get the same Personalizer body as everywhere else.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_body = settings.max_body_bytes
        self.max_model = settings.max_model_bytes
        self.body_timeout = settings.limits.body_timeout
        self.rate = settings.limits.rate_per_key
        self.burst = settings.limits.burst_per_key
        self.limiter: RateLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = _PATH.fullmatch(scope["path"])
        if m:
            scope = dict(scope)
            scope["path"] = "/personalizer" + (m.group(3) or "")
            scope["dloop.loop"] = m.group(1) or store.DEFAULT_LOOP
            scope["dloop.version"] = m.group(2)
        path, method = scope["path"], scope["method"]
        refused = None if is_public(path) else self._admit(scope)
        if refused is None and path.endswith(("\n", "\r")):
            # No route or id ends with one, but the router's `$` would match before it: not
            # found (for a client key, an operation it may not call, as elsewhere).
            admin = scope.get("dloop.role") == "admin"
            refused = errors.error_response(
                404 if admin else 403,
                "ResourceNotFound" if admin else "InvalidApiAccess",
                "no such path" if admin else "This key may not call this operation",
            )
        # Only the exact model import route takes bodies beyond max_body (it caps them itself).
        cap = self.max_model if method == "PUT" and path == "/personalizer/model" else self.max_body
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if refused is None and length is not None and length.isdigit() and int(length) > cap:
            refused = errors.error_response(
                413, "PayloadSizeExceeded", f"request body exceeds {cap} bytes"
            )
        if refused is not None:
            await refused(scope, receive, send)
            return
        receive = limited_receive(receive, cap=cap, timeout=self.body_timeout)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            if method == "POST" and (hot := _HOT.fullmatch(path)):
                await self._hot(hot, scope, receive, tracked)
            else:
                await self.app(scope, receive, tracked)
        except (BodyTooLarge, BodyTimeout) as exc:
            if started:
                raise
            await errors.http_error_response(exc)(scope, receive, send)

    def _admit(self, scope: Scope) -> Response | None:
        """401 without a valid key, 429 past its rate; None to let the request in. Roles and
        loops are the routes' to check."""
        d: Dloop = scope["app"].state.dloop
        digest = key_hash(d.keys, scope)
        if digest is None and d.refresh():  # a key created through another replica?
            digest = key_hash(d.keys, scope)
        if digest is None:
            if scope_key(scope) is None:
                message = "Access denied: missing Ocp-Apim-Subscription-Key header"
            else:
                message = "Access denied: invalid subscription key"
            return errors.error_response(401, "Unauthorized", message)
        entry = d.keys.get(digest)
        scope["dloop.role"] = entry[0] if entry is not None else None
        if self.limiter is None:
            self.limiter = RateLimiter(self.rate, self.burst, d.clock)
        wait = self.limiter.check(digest)
        if wait:
            message = f"this key is limited to {self.rate:g} requests a second"
            return errors.ApiError(429, "TooManyRequests", message, retry_after=wait).response()
        return None

    async def _hot(self, hot: re.Match[str], scope: Scope, receive: Receive, send: Send) -> None:
        if hot.group(2) is not None:
            scope["path_params"] = {"event_id": hot.group(2)}
        try:
            response = await _HOT_HANDLERS[hot.group(1) or hot.group(3)](Request(scope, receive))
        except errors.ApiError as exc:
            response = exc.response()
        except (BodyTooLarge, BodyTimeout):
            raise
        except Exception:
            errors.log.exception("unhandled error")
            response = errors.error_response(500, "InternalServerError", "internal error")
        await response(scope, receive, send)


class Watcher:
    """Serve mode: reload loops, keys and models that other processes changed.

    On Postgres it LISTENs for the learners' notifications and reloads as soon as a model is
    published; every `every` seconds it reloads anyway (configuration and key changes made
    through other replicas, and any notification lost while the connection was down).
    Embedded mode (`keys_only`): only keys, which `dloop keys` may change beside a running
    `dloop up`; the worker owns loops and models there.
    """

    def __init__(self, d: Dloop, every: float = 0.5, *, keys_only: bool = False) -> None:
        self.d = d
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
                    with self.d.sessions() as session:
                        # The loops named in notifications at once; all of them now and then
                        # (changes whose notification was lost while the connection was down).
                        if time.monotonic() - full_at >= self.every * 10:
                            full_at = time.monotonic()
                            self.d.registry.load(session)
                        elif changed:
                            self.d.registry.load(session, changed)
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
    serve = settings.kafka.bootstrap_servers is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        private_dir(settings.data_dir)
        engine = make_engine(settings.database_url)
        sessions = make_sessionmaker(engine)
        lock = None
        model_dir = settings.data_dir / "models"
        if serve:
            replica_dir, lock = claim_replica(settings.data_dir)
            model_dir = replica_dir / "models"
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
        log_dir = settings.data_dir / "log"
        if serve:
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
                max_dangling=settings.max_dangling,
            )
        sandbox = settings.sandbox
        rankers = (
            RankerPool(
                sandbox.rankers,
                timeout=sandbox.rank_timeout,
                wait=sandbox.wait_timeout,
                cache_models=sandbox.cached_models,
            )
            if sandbox.rankers > 0
            else InlineRankers(sandbox.cached_models)
        )
        await rankers.start()
        d = Dloop(
            settings, engine, sessions, decision_log, registry, worker, rankers, clock, publisher
        )
        d.reload_keys()
        app.state.dloop = d
        if publisher is not None:
            stoppables += [publisher, Watcher(d)]
        elif run_worker and worker is not None:
            stoppables += [worker, Watcher(d, every=1.0, keys_only=True)]
        if run_worker:
            stoppables.append(AutoOptimizer(d.control))
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
            deadline = time.monotonic() + 30  # a bounded shutdown, however many loops
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    errors.log.warning("%s did not stop within 30 s; leaving it", thread.name)
            d.jobs.close()
            if worker is not None:
                worker.close()
            await rankers.close()
            decision_log.close()
            engine.dispose()
            if lock is not None:
                os.close(lock)

    app = FastAPI(
        title="dloop",
        summary="Self-hosted online decision service, wire-compatible with Azure AI Personalizer",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    errors.install(app)
    routers = (events, multislot, configuration, evaluations, model, logs, loops, keys, health)
    for module in routers:
        app.include_router(module.router)
    openapi.install(app, [route for module in routers for route in module.router.routes])
    if settings.docs:
        docs.install(app)
    app.add_middleware(PathStyles, settings=settings)
    # Added last: outermost, so they see PathStyles' answers too.
    app.add_middleware(CountErrors)
    app.add_middleware(NoSniff)
    return app
