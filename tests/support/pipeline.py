"""The Kafka path's workers under test, on a real broker and Postgres: settings and sessions for
fresh topics (`pipeline`), failures made deterministic (`FlakySessions` raise once, as a
restarting Postgres does; `TellingConsumer` says when a poll returned records), a worker's real
loop in a thread (`running`), and waiting for its stored offsets to reach a topic's end."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.core.settings import Settings, load_settings
from service.storage import kafka
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from tests.support.production import caught_up_at
from tests.support.services import Broker


def pipeline(
    postgres_url: str, kafka_broker: Broker, *, partitions: int
) -> tuple[Settings, Engine, sessionmaker[Session]]:
    """Settings for a migrated database and fresh topics on the broker, and sessions on it."""
    upgrade(postgres_url)
    settings = load_settings(
        db={"url": postgres_url},
        kafka={
            "bootstrap_servers": kafka_broker.address,
            "topic_prefix": f"t{uuid.uuid4().hex[:8]}",
            "partitions": partitions,
        },
    )
    kafka.ensure_topics(settings)
    engine = make_engine(postgres_url)
    return settings, engine, make_sessionmaker(engine)


class FlakySessions:
    """Real sessions on the real database, except that the first session or transaction opened
    once `when()` holds raises the OperationalError a restarting Postgres gives."""

    def __init__(self, sessions: Any, when: Callable[[], bool]) -> None:
        self._sessions = sessions
        self.when = when
        self.failed = 0

    def _maybe_fail(self) -> None:
        if not self.failed and self.when():
            self.failed += 1
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))

    def __call__(self) -> Session:
        self._maybe_fail()
        s: Session = self._sessions()
        return s

    def begin(self) -> Any:
        self._maybe_fail()
        return self._sessions.begin()


class TellingConsumer:
    """A real kafka-python consumer that says when a poll has returned records to its worker:
    records of a poll in which the assignment changed are dropped by the worker (they are read
    again), so only a poll with the same assignment before and after counts."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self.polled_records = False

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        before = self._consumer.assignment()
        batch = self._consumer.poll(*args, **kwargs)
        stable = bool(before) and before == self._consumer.assignment()
        self.polled_records |= bool(batch) and stable
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


@contextmanager
def running(worker: Any) -> Iterator[threading.Thread]:
    """`worker.run()` (the real loop, with its recovery) in a thread, stopped on exit."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.request_stop()
        thread.join(60)
        assert not thread.is_alive(), "the worker did not stop"


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def caught_up_with(
    postgres_url: str, settings: Settings, kind: str, topic: str
) -> Callable[[], bool]:
    servers = settings.kafka.bootstrap_servers
    assert servers
    return lambda: caught_up_at(postgres_url, servers, kind, topic)


def learn_to(
    settings: Settings, sessions: sessionmaker[Session], *, position: int, what: str
) -> None:
    """Run a stream learner (checkpointing every step) until the default loop's checkpoint
    stands at `position` in the joined stream; fails with `what` after 60 s."""
    from service.pipeline.learn_worker import LearnWorker
    from service.storage.models import ModelCheckpoint

    learner = LearnWorker(
        sessions=sessions,
        consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.learner"),
        joined_topic=kafka.joined_topic(settings),
    )
    deadline = time.time() + 60
    try:
        while True:
            learner.run_once(poll_ms=200)
            learner.checkpoint()
            with sessions() as session:
                ckpt = session.get(ModelCheckpoint, "default")
                if ckpt is not None and ckpt.position == position:
                    return
            assert time.time() < deadline, what
    finally:
        learner.consumer.close()
        learner.host.close()
