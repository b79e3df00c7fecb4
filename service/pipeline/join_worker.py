"""`dloop join`: consume the events topic, join rewards to decisions in the database, and
publish joined interactions to the joined topic.

Exactly once: each poll's records are ingested together with the partition offsets they reach
in one database transaction (decisions keyed by eventId, observations by uid, so a record seen
twice is stored once); Kafka offsets are committed only after that, and on assignment or after
a failed step the consumer seeks back to the offsets in the database (service.consumer), so
neither a crash nor an outage loses or repeats a record. Joins take their rows with SKIP LOCKED,
so joiners scale out. Joined rows leave through an outbox: one joiner at a time gives them
gap-free per-loop positions, then they are published and marked; a row published twice keeps
its position and learners skip it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka.structs import OffsetAndMetadata
from sqlalchemy.orm import Session, sessionmaker

from service.core import record
from service.core.joined import PACK_BYTES, PACK_ROWS, joined_message
from service.pipeline.background import is_transient, keep_running
from service.pipeline.consumer import StoredOffsets, offset_name
from service.pipeline.guardrails import check_loop
from service.pipeline.join import compact_stats, join_due
from service.storage import kafka, store

log = logging.getLogger("dloop.join")


COMPACT_EVERY = 600.0  # seconds between two compactions of the rollups


class JoinWorker:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        consumer: Any,
        producer: Any,
        events_topic: str,
        joined_topic: str,
        clock: Callable[[], float] = time.time,
        batch_size: int = 2000,
        max_dangling: int = store.MAX_DANGLING,
    ) -> None:
        self.sessions = sessions
        self.consumer = consumer
        self.producer = producer
        self.events_topic = events_topic
        self.joined_topic = joined_topic
        self.clock = clock
        self.batch_size = batch_size
        self.max_dangling = max_dangling
        # Event time of the last record read from each partition.
        self.read_until: dict[Any, float] = {}
        self.compacted_at = 0.0  # when the rollups were last compacted (join.compact_stats)
        self._stop = threading.Event()
        # Nothing to drop on a rewind: a poll's records are ingested in one transaction with
        # their offsets, and `read_until` moves only after it committed.
        self.source = StoredOffsets(
            consumer, sessions, kind="join", topic=events_topic, drop=lambda: None
        )

    def run(self) -> None:
        """Until stopped; an outage rewinds and retries, a bug raises (service.background)."""
        try:
            keep_running(
                self._stop,
                self.run_once,
                what="join pass",
                logger=log,
                recover=self.source.rewind,
                transient=is_transient,
            )
        finally:
            self.consumer.close()

    def request_stop(self) -> None:
        self._stop.set()

    def run_once(self, poll_ms: int = 500) -> int:
        """Ingest one poll, join what is due, publish joined rows; returns records ingested."""
        batch = self.source.poll(timeout_ms=poll_ms, max_records=self.batch_size)
        count = sum(len(m) for m in batch.values())
        if batch:
            now = self.clock()
            with self.sessions.begin() as session:
                store.ingest(
                    session,
                    records=[m.value for msgs in batch.values() for m in msgs],
                    source=self.events_topic,
                    now=now,
                )
                for tp, msgs in batch.items():
                    store.set_offset(
                        session, name=offset_name("join", tp), offset=msgs[-1].offset + 1
                    )
            for tp, msgs in batch.items():
                self.read_until[tp] = record.time_of(msgs[-1].value)
            self.consumer.commit(
                {tp: OffsetAndMetadata(msgs[-1].offset + 1, None, -1) for tp, msgs in batch.items()}
            )
        self.join_due()
        self.publish_joined()
        return count

    def watermark(self) -> float:
        """How far in event time this joiner has read everything: now if it has caught up with
        every partition, else the time of the last record read from a lagging one. A decision's
        reward window is judged against this, so a joiner that is behind (after a restart or a
        rebalance) never closes a window whose rewards are still unread in Kafka."""
        mark = self.clock()
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            position = self.consumer.position(tp, timeout_ms=0)
            if high is None or position is None or position < high:
                mark = min(mark, self.read_until.get(tp, 0.0))
        return mark

    def join_due(self) -> None:
        if self.clock() - self.compacted_at >= COMPACT_EVERY:
            self.compacted_at = self.clock()
            compact_stats(self.sessions, self.compacted_at)
        now = self.watermark()
        with self.sessions() as session:
            loops = [(loop.name, store.loop_settings(loop)) for loop in store.list_loops(session)]
        for name, settings in loops:
            while True:
                with self.sessions.begin() as session:
                    n = join_due(
                        session,
                        loop=name,
                        rules=settings.rules,
                        now=now,
                        limit=self.batch_size,
                        max_dangling=self.max_dangling,
                        tracked=settings.tracked,
                    )
                    if n:
                        flip = check_loop(
                            session, loop=name, guardrails=settings.guardrails, now=now
                        )
                        if flip is not None:
                            store.notify_models(session, [name])  # replicas reload at once
                if n < self.batch_size:
                    break

    def publish_joined(self) -> int:
        with self.sessions.begin() as session:
            store.assign_positions(session, limit=self.batch_size * 5)
        with self.sessions() as session:
            rows = store.unpublished(session, limit=self.batch_size * 5)
            seqs = [row.seq for row in rows]
            packs: list[tuple[str, list[tuple[int, bool, str]]]] = []
            size = 0
            for row in rows:  # ordered by loop, then position
                if (
                    not packs
                    or packs[-1][0] != row.loop
                    or len(packs[-1][1]) >= PACK_ROWS
                    or size + len(row.line) > PACK_BYTES
                ):
                    packs.append((row.loop, []))
                    size = 0
                packs[-1][1].append((row.pos or 0, store.trainable(row), row.line))
                size += len(row.line) + 24
        if not seqs:
            return 0
        kafka.send_all(
            self.producer,
            self.joined_topic,
            [(loop.encode(), joined_message(pack)) for loop, pack in packs],
            timeout=10,
        )
        with self.sessions.begin() as session:
            store.mark_published(session, seqs=seqs)
        return len(seqs)
