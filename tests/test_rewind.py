"""Nothing lost on a transient failure: a step that fails after kafka-python's poll() returned
records (the poll moved the consumer past them) must not skip them, and a worker that drops its
in-memory state must not learn anything twice. The failures are made deterministic: a real
database behind sessions that raise once, as a restarting Postgres does, at the moment that
matters."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kafka.errors as KafkaErrors
import orjson
import pytest
from kafka import TopicPartition
from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.core.joined import joined_message
from service.core.settings import Settings
from service.pipeline.join_worker import JoinWorker
from service.pipeline.learn_worker import LearnWorker
from service.storage import kafka, store
from service.storage.db import make_sessionmaker
from service.storage.models import Decision, Joined, ModelCheckpoint
from tests.conftest import AUTH, Broker, FakeClock, Harness
from tests.support.records import records
from tests.test_faults import Traffic, configure
from tests.test_hostile import body, dsjson
from tests.test_join_worker import pipeline
from tests.test_production import Stack, caught_up, caught_up_at, count, stack, stored_offsets

__all__ = ["stack"]  # the fixture


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


def test_a_joiner_whose_database_fails_after_a_poll_ingests_every_record_once(
    postgres_url: str, kafka_broker: Broker
) -> None:
    settings, engine, real_sessions = pipeline(postgres_url, kafka_broker, partitions=2)
    start = time.time()
    with real_sessions.begin() as session:
        store.ensure_loop(session, name="default", kind="cb", now=start)
    producer = kafka.producer(settings)
    kafka.send_all(producer, kafka.events_topic(settings), records(40, start), timeout=10)
    producer.close()
    consumer = TellingConsumer(
        kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.joiner")
    )
    # The ingest transaction of the first poll that returned records fails.
    sessions = FlakySessions(real_sessions, lambda: consumer.polled_records)
    joiner = JoinWorker(
        sessions=sessions,  # type: ignore[arg-type]
        consumer=consumer,
        producer=kafka.producer(settings),
        events_topic=kafka.events_topic(settings),
        joined_topic=kafka.joined_topic(settings),
        clock=FakeClock(start + 3600),  # every reward window has closed
        batch_size=7,
    )
    at_end = caught_up_with(postgres_url, settings, "join", kafka.events_topic(settings))

    def all_ingested_joined() -> bool:
        with real_sessions() as session:
            decisions = session.scalar(select(func.count()).select_from(Decision))
            joined = session.scalar(select(func.count()).select_from(Joined))
        return bool(decisions) and decisions == joined

    try:
        with running(joiner):
            wait_for(at_end, "the joiner's stored offsets to reach the end of the topic")
            wait_for(all_ingested_joined, "every ingested decision to be joined")
    finally:
        joiner.producer.close()
    assert sessions.failed == 1
    with real_sessions() as session:
        decisions = session.scalars(select(Decision.event_id)).all()
        rows = session.execute(select(Joined.event_id, Joined.line)).all()
    assert sorted(decisions) == sorted(f"b{i}" for i in range(40))
    assert len(rows) == 40
    for event_id, line in rows:
        assert orjson.loads(line)["_label_cost"] == -float(int(event_id[1:]) % 2), event_id
    engine.dispose()


def test_a_learner_whose_database_fails_after_a_poll_learns_every_row_once(
    postgres_url: str, kafka_broker: Broker
) -> None:
    settings, engine, real_sessions = pipeline(postgres_url, kafka_broker, partitions=1)
    with real_sessions.begin() as session:
        loop = store.ensure_loop(session, name="default", kind="cb", now=time.time())
        loop.config = {**loop.config, "modelExportFrequency": "PT1S"}
    rows = [(pos, True, dsjson([{"time": f"t{pos % 5}"}], f"e{pos}")) for pos in range(1, 31)]
    producer = kafka.producer(settings)
    messages = [(b"default", joined_message(rows[i : i + 5])) for i in range(0, 30, 5)]
    kafka.send_all(producer, kafka.joined_topic(settings), messages, timeout=10)
    producer.close()
    consumer = TellingConsumer(
        kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.learner")
    )
    # The first database read after a poll that returned records (the loop's checkpoint, to
    # build its learner) fails.
    sessions = FlakySessions(real_sessions, lambda: consumer.polled_records)
    learner = LearnWorker(
        sessions=sessions,  # type: ignore[arg-type]
        consumer=consumer,
        joined_topic=kafka.joined_topic(settings),
        batch_size=3,  # several polls
    )
    at_end = caught_up_with(postgres_url, settings, "learn", kafka.joined_topic(settings))
    with running(learner):
        wait_for(at_end, "the learner's stored offsets to reach the end of the topic")
    assert sessions.failed == 1
    with real_sessions() as session:
        ckpt = session.get(ModelCheckpoint, "default")
        assert ckpt is not None, "nothing was checkpointed"
        assert (ckpt.position, ckpt.examples) == (30, 30)  # every row, once
    engine.dispose()


def test_the_embedded_worker_whose_database_fails_mid_learning_learns_every_row_once(
    harness: Harness,
) -> None:
    """The embedded worker reads its log offset inside the ingest transaction, so it cannot
    skip records; but a pass that fails after the trainer learned (here: writing the dead
    letter of a line VW refused) must not leave those lines learned in memory to be learned
    again."""
    h = harness
    h.configure(rewardWaitTime="PT1S", modelExportFrequency="PT1S")
    worker = h.dloop.worker
    assert worker is not None
    with h.dloop.sessions.begin() as session:  # joined seq 1: a line VW refuses
        session.add(
            Joined(
                loop="default",
                event_id="p1",
                created_at=h.clock(),
                joined_at=h.clock(),
                mode="Online",
                learnable=True,
                reward=1.0,
                rewarded=True,
                imitated=False,
                line=dsjson([{"_multi": []}]),
                published=False,
            )
        )
    for i in range(3):
        assert (
            h.client.post(
                "/personalizer/v1.0/rank", json=body(f"e{i}", [{"a": i}]), headers=AUTH
            ).status_code
            == 201
        )
        h.reward(f"e{i}", 1.0)
    h.clock.advance(5)

    def learned_something() -> bool:
        learner = worker.learners.get("default")
        return learner is not None and learner.trainer.examples > 0

    worker.sessions = FlakySessions(worker.sessions, learned_something)  # type: ignore[assignment]

    def exported() -> bool:
        with h.dloop.sessions() as session:
            ckpt = session.get(ModelCheckpoint, "default")
            return ckpt is not None and ckpt.position == 4

    with running(worker):
        wait_for(exported, "the loop's model to be exported")
    assert worker.sessions.failed == 1  # type: ignore[attr-defined]
    with h.dloop.sessions() as session:
        ckpt = session.get(ModelCheckpoint, "default")
        assert ckpt is not None and ckpt.examples == 3  # the three good rows, once


# ---- the error taxonomy and the rebalance callbacks -------------------------------------------


def test_an_outage_is_waited_out_and_recovered_from_and_a_bug_stops_the_worker() -> None:
    from service.pipeline.background import is_transient, keep_running

    log = logging.getLogger("test")
    stop = threading.Event()
    calls: list[str] = []
    outages = [
        OperationalError("SELECT 1", {}, Exception("connection refused")),
        KafkaErrors.CommitFailedError(),
        KafkaErrors.KafkaTimeoutError(),
    ]

    def step() -> bool:
        calls.append("step")
        if outages:
            raise outages.pop(0)
        if calls.count("step") == 4:
            raise KeyError("a bug")
        return True

    def recover() -> None:
        calls.append("recover")
        if calls.count("recover") == 1:  # the database is still away: retried later
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(KeyError):
        keep_running(
            stop, step, what="t", logger=log, backoff=0.001, recover=recover, transient=is_transient
        )
    # every failed step is followed by a recovery before the next step; the bug is not retried
    assert calls == [
        "step",
        "recover",  # failed: the database is still away
        "recover",
        "step",
        "recover",
        "step",
        "recover",
        "step",  # the bug
    ]
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_transient(ValueError())


def test_rebalance_callbacks_only_do_bookkeeping(postgres_url: str, kafka_broker: Broker) -> None:
    """kafka-python calls them inside poll(): they touch neither the database nor the models.
    The learner drops its unsaved models and rewinds in its own step after the poll."""
    settings, engine, real_sessions = pipeline(postgres_url, kafka_broker, partitions=1)

    def no_database() -> bool:
        raise AssertionError("a rebalance callback used the database")

    learner = LearnWorker(
        sessions=FlakySessions(real_sessions, no_database),  # type: ignore[arg-type]
        consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.learner"),
        joined_topic=kafka.joined_topic(settings),
    )
    try:
        learner.learners["default"] = "unsaved"  # type: ignore[assignment]
        tp = TopicPartition(kafka.joined_topic(settings), 0)
        learner.source.on_partitions_revoked([tp])
        learner.source.on_partitions_assigned([tp])
        assert learner.learners == {"default": "unsaved"} and learner.source.changed
    finally:
        learner.consumer.close()
        learner.host.close()
        engine.dispose()


def test_learners_rebalancing_mid_stream_learn_every_row_once(
    postgres_url: str, kafka_broker: Broker
) -> None:
    """A second learner joins the group while the first is learning: both drop what they had
    not checkpointed and rewind (the callbacks only took note), so each loop's model holds every
    row once, whoever learned it."""
    settings, engine, sessions = pipeline(postgres_url, kafka_broker, partitions=2)
    loops = ("default", "other")  # keys on partitions 1 and 0
    with sessions.begin() as session:
        for name in loops:
            loop = store.ensure_loop(session, name=name, kind="cb", now=time.time())
            loop.config = {**loop.config, "modelExportFrequency": "PT1S"}
    topic = kafka.joined_topic(settings)
    producer = kafka.producer(settings)

    def publish(first: int, last: int) -> None:
        messages = [
            (
                name.encode(),
                joined_message(
                    [(p, True, dsjson([{"t": f"t{p % 3}"}], f"{name}{p}")) for p in range(i, i + 5)]
                ),
            )
            for name in loops
            for i in range(first, last + 1, 5)
        ]
        kafka.send_all(producer, topic, messages, timeout=10)

    def learned(seq: int) -> Callable[[], bool]:
        def check() -> bool:
            with sessions() as session:
                ckpts = [session.get(ModelCheckpoint, name) for name in loops]
            return all(c is not None and c.position >= seq for c in ckpts)

        return check

    def learner() -> LearnWorker:
        return LearnWorker(
            sessions=sessions,
            consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.learner"),
            joined_topic=topic,
            batch_size=4,
        )

    first, second = learner(), learner()
    publish(1, 20)
    try:
        with running(first):
            wait_for(learned(20), "the first learner to learn both loops")
            publish(21, 40)
            with running(second):
                publish(41, 60)
                wait_for(learned(60), "both loops learned to the end")
                wait_for(
                    lambda: all(w.consumer.assignment() for w in (first, second)),
                    "the partitions to be shared",
                )
    finally:
        producer.close()
    assert second.source.rewinds >= 1 and first.source.rewinds >= 2  # start, then rebalance
    with sessions() as session:
        for name in loops:
            ckpt = session.get(ModelCheckpoint, name)
            assert ckpt is not None and (ckpt.position, ckpt.examples) == (60, 60), name
    engine.dispose()


# ---- end to end: Postgres restarted under load ------------------------------------------------


def test_a_postgres_restart_mid_stream_loses_and_repeats_nothing(stack: Stack) -> None:
    """`dloop serve` + `join` + `learn` under steady rank and reward traffic; Postgres restarts
    once both workers are mid-stream. Every decision is joined exactly once with its reward and
    learned exactly once, judged when the stored offsets reach the ends of both topics."""
    configure(stack)
    events, joined = (f"{stack.env['DLOOP_KAFKA__TOPIC_PREFIX']}.{t}" for t in ("events", "joined"))
    engine = create_engine(stack.db_url, pool_pre_ping=True)
    sessions = make_sessionmaker(engine)
    n = 800
    traffic = Traffic(stack, 0, n, pace=0.01)
    traffic.start()

    def stored(kind: str, topic: str) -> int:
        return sum(stored_offsets(stack.db_url, kind, topic).values())

    def mid_stream() -> bool:
        # Both workers have consumed (and stored) records since they started, and traffic goes on.
        return stored("join", events) > 0 and stored("learn", joined) > 0 and traffic.is_alive()

    wait_for(mid_stream, "the joiner and the learner to be mid-stream")
    at_restart = (stored("join", events), stored("learn", joined))
    subprocess.run(
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main restart",
        shell=True,
        check=True,
    )
    traffic.join()
    assert traffic.is_alive() is False and not traffic.errors, traffic.errors[:5]
    assert stored("join", events) > at_restart[0] and stored("learn", joined) > at_restart[1]
    # Published to the end: the events topic is complete once both replicas' logs are empty.
    wait_for(
        lambda: all(stack.api("GET", "/readyz").json()["logBacklogBytes"] == 0 for _ in range(10)),
        "the replicas to publish their logs",
    )
    wait_for(
        lambda: caught_up(stack, "join", events), "the joiner to read the events topic to its end"
    )
    wait_for(
        lambda: count(stack.db_url, select(func.count()).select_from(Joined)) >= n,
        "every decision to be joined",
        timeout=90,
    )
    wait_for(
        lambda: count(stack.db_url, select(func.count()).where(Joined.published.is_(False))) == 0,
        "the joined rows to be published",
    )
    wait_for(
        lambda: caught_up(stack, "learn", joined), "the learner to read the joined topic to its end"
    )
    with sessions() as session:
        rows = session.execute(select(Joined.event_id, Joined.reward)).all()
        ckpt = session.get(ModelCheckpoint, "default")
        last_pos = session.scalar(select(func.max(Joined.pos)))
    assert len(rows) == n and len({e for e, _ in rows}) == n
    for event_id, reward in rows:
        assert reward == (int(event_id[1:]) % 4) / 4, event_id
    # The learner checkpoints what it consumed each tick: its last stored offsets come with the
    # model that includes every joined row, each once.
    wait_for(lambda: checkpoint(sessions).position == last_pos, "the last checkpoint")
    ckpt = checkpoint(sessions)
    assert ckpt.examples == n, f"{ckpt.examples} learned for {n} joined"
    engine.dispose()


def checkpoint(sessions: sessionmaker[Session]) -> ModelCheckpoint:
    with sessions() as session:
        ckpt = session.get(ModelCheckpoint, "default")
        assert ckpt is not None
        session.expunge(ckpt)
        return ckpt
