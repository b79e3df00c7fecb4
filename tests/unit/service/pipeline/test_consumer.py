"""Where a Kafka consumer resumes (service.pipeline.consumer): the rebalance callbacks only do
bookkeeping, inside poll(), touching neither the database nor the models."""

from __future__ import annotations

from kafka import TopicPartition

from service.pipeline.learn_worker import LearnWorker
from service.storage import kafka
from tests.support.pipeline import FlakySessions, pipeline
from tests.support.services import Broker


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
