"""The Kafka joiner on a real broker and Postgres: a joiner that is behind on its partitions
closes no reward window before it has read the rewards inside it."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.core.settings import Settings, load_settings
from service.pipeline.join import join_due
from service.pipeline.join_worker import JoinWorker
from service.storage import kafka, store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Joined, Loop
from tests.conftest import Broker, FakeClock
from tests.support.records import records


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


def test_dangling_observations_are_bounded_on_postgres(postgres_url: str) -> None:
    """Rewards for eventIds that never got a decision: the newest are kept, the rest counted."""
    from sqlalchemy import func

    from service.storage.models import Observation

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            loop = store.ensure_loop(session, name="default", kind="cb", now=0.0)
            rules = store.loop_settings(loop).rules
            orphans = [
                orjson.dumps({"k": "r", "loop": "default", "id": f"u{i}", "t": i, "v": 1.0})
                for i in range(10)
            ]
            store.ingest(session, records=orphans, source="test", now=10.0)
        with sessions.begin() as session:
            join_due(session, loop="default", rules=rules, now=1000.0, limit=10, max_dangling=4)
        with sessions.begin() as session:
            assert store.drop_dangling(session, loop="default", keep=4) == 0
            assert store.drop_dangling(session, loop="default", keep=3) == 1
        with sessions() as session:
            kept = session.scalars(select(Observation.event_id).order_by(Observation.id)).all()
            assert kept == ["u7", "u8", "u9"]
            assert store.loop_counts(session)["default"]["observations_dropped"] == 7
            assert session.scalar(select(func.count()).select_from(Observation)) == 3
    finally:
        engine.dispose()


def test_the_stream_learner_dead_letters_a_line_that_crashes_vw_and_learns_on(
    postgres_url: str, kafka_broker: Broker
) -> None:
    """`dloop learn`: a joined line that segfaults VW (as an older writer could have published
    it) kills only the learning process; the learner finds it by relearning the batch line by
    line from its checkpoint, dead-letters it, and learns every other line exactly once."""
    from service.core.joined import joined_message
    from service.pipeline.learn_worker import SOURCE, LearnWorker
    from service.storage.models import DeadLetter, ModelCheckpoint
    from tests.test_hostile import dsjson

    settings, engine, sessions = pipeline(postgres_url, kafka_broker, partitions=1)
    with sessions.begin() as session:
        store.ensure_loop(session, name="default", kind="cb", now=time.time())
    good = dsjson([{"time": "noon"}])
    rows = [(pos, True, dsjson([{"__aid": 0}]) if pos == 7 else good) for pos in range(1, 13)]
    producer = kafka.producer(settings)
    messages = [(b"default", joined_message(rows[i : i + 4])) for i in range(0, 12, 4)]
    kafka.send_all(producer, kafka.joined_topic(settings), messages, timeout=10)
    producer.close()
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
                if ckpt is not None and ckpt.position == 12:
                    break
            assert time.time() < deadline, "the learner did not get past the poison"
    finally:
        learner.consumer.close()
        learner.host.close()
    with sessions() as session:
        ckpt = session.get(ModelCheckpoint, "default")
        assert ckpt is not None and ckpt.examples == 11  # every line but the poison, once
        letters = list(session.scalars(select(DeadLetter).where(DeadLetter.source == SOURCE)))
    assert [(d.loop, d.ref) for d in letters] == [("default", 7)]
    assert "native crash" in letters[0].reason
    engine.dispose()


def test_a_nul_in_an_id_is_refused_and_cannot_stop_ingestion(
    postgres_url: str, tmp_path: Path
) -> None:
    """Postgres refuses NUL in text: a reward for eventId "a\\0b" used to be accepted, then made
    every worker pass fail, so no loop ingested anything any more."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import AUTH, Harness, make_settings

    upgrade(postgres_url)
    settings = make_settings(tmp_path / "data", db={"url": postgres_url})
    with TestClient(create_app(settings, clock=FakeClock(), run_worker=False)) as client:
        h = Harness(client, FakeClock())
        r = client.post("/personalizer/v1.0/events/a%00b/reward", json={"value": 1}, headers=AUTH)
        assert r.status_code == 400, r.text
        body = {"eventId": "a\x00b", "actions": [{"id": "x", "features": [{"f": 1}]}]}
        assert client.post("/personalizer/v1.0/rank", json=body, headers=AUTH).status_code == 400
        assert client.get("/personalizer/v1.0/events/a%00b", headers=AUTH).status_code == 404
        # and what reaches the log anyway (another version, another producer) is dead-lettered
        h.dloop.log.append(orjson.dumps({"k": "r", "loop": "default", "id": "a\x00b", "t": 1.0}))
        h.rank({"eventId": "fine", "actions": [{"id": "x", "features": [{"f": 1}]}]})
        h.work()
        with h.dloop.sessions() as session:
            assert store.event(session, loop="default", event_id="fine") is not None
            assert store.dead_letter_count(session) == 1
