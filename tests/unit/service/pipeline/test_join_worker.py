"""`dloop join` (service.pipeline.join_worker) on a real broker and Postgres: a joiner that is
behind on its partitions closes no reward window before it has read the rewards inside it, and
one whose database fails right after a poll returned records ingests every record once."""

from __future__ import annotations

import time

import orjson
import pytest
from sqlalchemy import func, select

from service.pipeline.join_worker import JoinWorker
from service.storage import kafka, store
from service.storage.models import Decision, Joined, Loop
from tests.support.harness import FakeClock
from tests.support.pipeline import (
    FlakySessions,
    TellingConsumer,
    caught_up_with,
    pipeline,
    running,
    wait_for,
)
from tests.support.records import records
from tests.support.services import Broker


@pytest.mark.slow
def test_a_lagging_joiner_reads_the_rewards_before_closing_their_windows(
    postgres_url: str, kafka_broker: Broker
) -> None:
    settings, engine, sessions = pipeline(postgres_url, kafka_broker, partitions=2)
    start = time.time()
    with sessions.begin() as session:
        loop = store.ensure_loop(session, name="default", kind="cb", now=start)
        loop.config = {**loop.config, "rewardWaitTime": "PT5S", "rewardAggregation": "sum"}
    # A backlog: 40 decisions, then their rewards (value 1), all read an hour later.
    pairs = records(40, start)
    decisions, rewards = pairs[0::2], pairs[1::2]
    producer = kafka.producer(settings)
    kafka.send_all(producer, kafka.events_topic(settings), decisions + rewards, timeout=10)
    producer.close()
    clock = FakeClock(start + 3600)
    joiner = JoinWorker(
        sessions=sessions,
        consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.joiner"),
        producer=kafka.producer(settings),
        events_topic=kafka.events_topic(settings),
        joined_topic=kafka.joined_topic(settings),
        clock=clock,
        batch_size=7,  # a few records per poll
    )
    deadline = time.time() + 60
    try:
        while True:
            joiner.run_once(poll_ms=200)
            with sessions() as session:
                rows = session.execute(select(Joined.event_id, Joined.line)).all()
            if len(rows) == 40:
                break
            assert time.time() < deadline, f"{len(rows)} of 40 joined"
    finally:
        joiner.consumer.close()
        joiner.producer.close()
    with sessions() as session:
        assert session.get(Loop, "default") is not None
    for event_id, line in rows:
        i = int(event_id[1:])
        assert orjson.loads(line)["_label_cost"] == -float(i % 2), event_id
    engine.dispose()


@pytest.mark.slow
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
