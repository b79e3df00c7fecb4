"""The per-process objects routes need, built by the lifespan in service.app."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from learners.worker import EmbeddedWorker
from service import store
from service.auth import authorize
from service.errors import ApiError
from service.log import LocalLog
from service.publisher import LogPublisher
from service.runtime import LoopRuntime, Registry
from service.settings import Settings


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.ranks = Counter("dloop_rank", "Rank calls answered", ["loop"], registry=r)
        self.rank_retries = Counter(
            "dloop_rank_retries",
            "Rank calls answered from the idempotency cache",
            ["loop"],
            registry=r,
        )
        self.rewards = Counter("dloop_reward", "Reward calls accepted", ["loop"], registry=r)
        self.activations = Counter(
            "dloop_activate", "Activate calls accepted", ["loop"], registry=r
        )
        self.errors = Counter("dloop_http_errors", "4xx/5xx answers", ["code"], registry=r)


@dataclass
class Dloop:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    log: LocalLog
    registry: Registry
    worker: EmbeddedWorker | None
    clock: Callable[[], float] = time.time
    publisher: LogPublisher | None = None
    keys: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)

    def backlog(self) -> int:
        """Bytes of the local log not yet ingested (embedded) or published to Kafka (serve)."""
        consumed = (
            self.worker.offset if self.worker else self.publisher.offset if self.publisher else 0
        )
        return self.log.end() - consumed

    def reset_model(
        self, name: str, *, model: bytes | None, retrain_since: float | None = None
    ) -> None:
        """Replace a loop's model (None: blank) from the next event on."""
        if self.worker is not None:
            self.worker.reset(name, model=model, retrain_since=retrain_since)
            return
        rt = self.registry.loops[name]
        with self.sessions.begin() as session:
            model_id, _ = store.reset_checkpoint(
                session,
                loop=name,
                model=model,
                arguments=rt.arguments,
                now=self.clock(),
                keep_position=True,
            )
        self.registry.publish(name, model, model_id)

    def reload_keys(self) -> None:
        with self.sessions() as session:
            self.keys = store.key_table(session)


def dloop(request: Request) -> Dloop:
    d: Dloop = request.app.state.dloop
    return d


def loop_name(request: Request) -> str:
    return str(request.scope.get("dloop.loop", store.DEFAULT_LOOP))


def loop_for(request: Request, *, admin: bool) -> tuple[Dloop, LoopRuntime]:
    """Authorize the caller for the request's loop and return it (404 if it does not exist)."""
    d = dloop(request)
    name = loop_name(request)
    authorize(d.keys, request, loop=name, admin=admin)
    rt = d.registry.get(name)
    if rt is None:
        raise ApiError(404, "ResourceNotFound", f"loop '{name}' does not exist")
    return d, rt
