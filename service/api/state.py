"""The app state: the per-process resources routes need, built by the lifespan in service.app
and reached by routes through service.api.deps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from learners.features import FeatureLimits
from learners.sandbox import RankerPool
from service.api.auth import KeyTable
from service.api.session import SECRET_NAME, UISessions
from service.core.settings import Settings
from service.pipeline.control import LoopControl
from service.pipeline.embedded import EmbeddedWorker
from service.pipeline.evaluations import Jobs
from service.pipeline.learner_process import LearnerProcess
from service.pipeline.publisher import LogPublisher
from service.pipeline.runtime import Registry, RetryCache
from service.storage import store
from service.storage.log import LocalLog


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
        self.event_id_reused = Counter(
            "dloop_event_id_reused",
            "Rank calls with an eventId this process had answered for another request: ranked"
            " for their own content and not logged (the first decision joins)",
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
    """One process's resources: settings, database, local log, loops and their served models,
    ranking processes, the embedded learner (None when Kafka's learners do it), the publisher
    (None when embedded), API keys, metrics, offline jobs and loop control. The keys and loops
    are caches of the database: the watcher reloads them, and `refresh` does at once when a
    request names a key or loop another replica has just made."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    log: LocalLog
    registry: Registry
    worker: EmbeddedWorker | LearnerProcess | None
    rankers: RankerPool
    clock: Callable[[], float] = time.time
    publisher: LogPublisher | None = None
    keys: KeyTable = field(default_factory=KeyTable)
    metrics: Metrics = field(default_factory=Metrics)
    jobs: Jobs = field(init=False)
    control: LoopControl = field(init=False)
    feature_limits: FeatureLimits = field(init=False)
    retries: RetryCache = field(init=False)
    ui_sessions: UISessions = field(init=False)
    _refreshed: float = 0.0

    def __post_init__(self) -> None:
        self.jobs = Jobs(self.sessions, self.database_url)
        self.retries = RetryCache(self.settings.dedup_cache_bytes)
        self.control = LoopControl(
            self.sessions, self.registry, self.worker, self.clock, self.database_url
        )
        with self.sessions.begin() as session:
            secret = store.server_secret(session, name=SECRET_NAME, now=self.clock())
        self.ui_sessions = UISessions(secret)
        limits = self.settings.limits
        self.feature_limits = FeatureLimits(
            max_features=limits.max_features,
            max_namespace_features=limits.max_namespace_features,
            max_depth=limits.max_feature_depth,
        )

    @property
    def database_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=False)

    def refresh(self, loop: str | None = None) -> bool:
        """Serve mode: reload the keys, and `loop` if given, now (another replica may have
        changed them moments ago, before the watcher's next pass); at most every 0.2 s. False
        in embedded mode."""
        if self.publisher is None or time.monotonic() - self._refreshed < 0.2:
            return False
        self._refreshed = time.monotonic()
        if loop is not None:
            with self.sessions() as session:
                self.registry.load(session, [loop])
        self.reload_keys()
        return True

    def reload_keys(self) -> None:
        with self.sessions() as session:
            self.keys = KeyTable(store.key_table(session), self.clock, self.ui_sessions.read)
