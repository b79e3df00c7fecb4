"""`dloop learn` (service.pipeline.learn_worker) on a real broker and Postgres: every joined row
is learned once, whether the database fails right after a poll returned records (the poll moved
the consumer past them) or a second learner joins the group mid-stream; a line that crashes VW
is dead-lettered and learning goes on."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from sqlalchemy import select

from service.core.joined import joined_message
from service.pipeline.learn_worker import LearnWorker
from service.storage import kafka, store
from service.storage.models import ModelCheckpoint
from tests.support.pipeline import (
    FlakySessions,
    TellingConsumer,
    caught_up_with,
    learn_to,
    pipeline,
    running,
    wait_for,
)
from tests.support.records import dsjson
from tests.support.services import Broker


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_stream_learner_dead_letters_a_line_that_crashes_vw_and_learns_on(
    postgres_url: str, kafka_broker: Broker
) -> None:
    """`dloop learn`: a joined line that segfaults VW (as an older writer could have published
    it) kills only the learning process; the learner finds it by relearning the batch line by
    line from its checkpoint, dead-letters it, and learns every other line exactly once."""
    from service.pipeline.learn_worker import SOURCE
    from service.storage.models import DeadLetter

    settings, engine, sessions = pipeline(postgres_url, kafka_broker, partitions=1)
    with sessions.begin() as session:
        store.ensure_loop(session, name="default", kind="cb", now=time.time())
    good = dsjson([{"time": "noon"}])
    rows = [(pos, True, dsjson([{"__aid": 0}]) if pos == 7 else good) for pos in range(1, 13)]
    producer = kafka.producer(settings)
    messages = [(b"default", joined_message(rows[i : i + 4])) for i in range(0, 12, 4)]
    kafka.send_all(producer, kafka.joined_topic(settings), messages, timeout=10)
    producer.close()
    learn_to(settings, sessions, position=12, what="the learner did not get past the poison")
    with sessions() as session:
        ckpt = session.get(ModelCheckpoint, "default")
        assert ckpt is not None and ckpt.examples == 11  # every line but the poison, once
        letters = list(session.scalars(select(DeadLetter).where(DeadLetter.source == SOURCE)))
    assert [(d.loop, d.ref) for d in letters] == [("default", 7)]
    assert "native crash" in letters[0].reason
    engine.dispose()
