"""Kafka topics, producers and consumers (kafka-python), built from Settings.

Topics:
    {prefix}.events   decision, reward and activation records (the decision-log record format),
                      keyed by "{loop}/{eventId}" so every record of an event lands in one
                      partition and the joiners scale out on partitions;
    {prefix}.joined   joined interactions, keyed by loop so one loop's stream is ordered in one
                      partition and each loop has exactly one learner at a time.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from service.core.producing import PRODUCER_OPTIONS
from service.core.producing import send_all as send_all  # the producers of this module send with it
from service.core.settings import Settings


def events_topic(settings: Settings) -> str:
    return f"{settings.kafka.topic_prefix}.events"


def joined_topic(settings: Settings) -> str:
    return f"{settings.kafka.topic_prefix}.joined"


def _servers(settings: Settings) -> str:
    servers = settings.kafka.bootstrap_servers
    if not servers:
        raise RuntimeError("DLOOP_KAFKA__BOOTSTRAP_SERVERS is not set")
    return servers


def ensure_topics(settings: Settings) -> None:
    admin = KafkaAdminClient(bootstrap_servers=_servers(settings), client_id="dloop-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=settings.kafka.partitions, replication_factor=1)
            for name in (events_topic(settings), joined_topic(settings))
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process was first
                admin.create_topics(wanted)
    finally:
        admin.close()


def producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """An idempotent producer (service.core.producing.PRODUCER_OPTIONS)."""
    config: dict[str, Any] = {"bootstrap_servers": _servers(settings), **PRODUCER_OPTIONS}
    config.update(overrides)
    return KafkaProducer(**config)


def consumer(settings: Settings, *, group: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer in `group` (None: no group, for reading assigned partitions)."""
    config: dict[str, Any] = {
        "bootstrap_servers": _servers(settings),
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_interval_ms": settings.kafka.max_poll_interval_ms,
        "session_timeout_ms": settings.kafka.session_timeout_ms,
        "heartbeat_interval_ms": 1000,
        # 1 MB per partition per fetch (kafka-python's default): on Tansu, 4-16 MB fetches were
        # slower (a learner read 13k/s at 4 MB, 8k/s at 16 MB, 23k/s at 1 MB).
        "max_partition_fetch_bytes": 1 << 20,
        # kafka-python checks CRC32C in pure Python (a quarter of a learner's time in our
        # benchmark); TCP and the broker's own checks cover transport corruption.
        "check_crcs": False,
    }
    config.update(overrides)
    return KafkaConsumer(**config)
