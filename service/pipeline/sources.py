"""Where offline tools read logged interactions from: DSJSON lines of one loop in a time range.

- the loop's database (`db`, the default): the embedded SQLite or the production Postgres, i.e.
  every joined interaction the loop still keeps;
- the joined Kafka topic (`kafka`): `<prefix>.joined` from a time (`--since`, found with the
  broker's time index) or from an offset (`--offset`), up to its end when the read started;
- DSJSON files (any other value: a path, `-` for stdin), as `dloop logs export` writes them or
  as Personalizer exported them (single- and multi-slot); other lines are skipped.

Every line's features go through learners.features.clean_line (keys Personalizer ignores never
reach VW), wherever it comes from.

The embedded decision log itself is not a source: its segments are deleted once ingested, and
what they held lives on in the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from learners.dsjson import line_in_range
from learners.features import FeatureError, clean_line


def db_lines(
    session: Any, *, loop: str, since: float | None = None, until: float | None = None
) -> Iterator[str]:
    from service.storage import store

    yield from store.export_lines(session, loop=loop, since=since, until=until)  # cleaned there


def kafka_lines(
    settings: Any,
    *,
    loop: str,
    since: float | None = None,
    offset: int | None = None,
    until: float | None = None,
) -> Iterator[str]:
    """The loop's lines from the joined topic (its messages are keyed by loop)."""
    from kafka import TopicPartition

    from service.core.joined import read_joined
    from service.storage import kafka as k

    topic = k.joined_topic(settings)
    consumer = k.consumer(settings, group=None, consumer_timeout_ms=2000)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        if since is not None:
            found = consumer.offsets_for_times({tp: int(since * 1000) for tp in partitions})
            for tp in partitions:
                hit = found.get(tp)
                consumer.seek(tp, hit.offset if hit is not None else ends[tp])
        else:
            for tp in partitions:
                consumer.seek(tp, offset or 0)
        remaining = {tp for tp in partitions if consumer.position(tp) < ends[tp]}
        key = loop.encode()
        while remaining:
            batch = consumer.poll(timeout_ms=1000)
            if not batch:
                break
            for tp, messages in batch.items():
                for message in messages:
                    if message.offset >= ends[tp]:
                        remaining.discard(tp)
                        break
                    if message.key == key:
                        for _, _, line in read_joined(message.value):
                            if line_in_range(line, since, until):
                                try:
                                    yield clean_line(line)
                                except FeatureError:
                                    continue
                if consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        consumer.close()
