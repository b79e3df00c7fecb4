"""Where a Kafka consumer of dloop resumes: the offsets stored in the database, always.

`dloop join` and `dloop learn` store the offsets they have consumed in Postgres, in the same
transaction as what they made of the records (ingested rows, model checkpoints); the offsets
they commit to Kafka are only for monitoring. kafka-python's poll() moves the consumer's
position past the records it returns, so whenever what a worker holds in memory and its position
may disagree with the database, the worker drops what it built since its last durable point and
every assigned partition goes back to its stored offset (from the start when nothing is stored):
- after a step failed on an outage (service.background: the error taxonomy, and `keep_running`
  calls `rewind` before the next step);
- after the assignment changed in a poll (a rebalance): the records that poll returned are
  dropped (they are read again from the stored offsets), and partitions handed to another
  worker leave nothing behind that could be saved later.
Rebalance callbacks run inside poll() and only do bookkeeping (they note that the assignment
changed); the database reads, seeks and dropping happen in the worker's own step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from sqlalchemy.orm import Session, sessionmaker

from service.storage import store

log = logging.getLogger("dloop.consumer")


def offset_name(kind: str, tp: TopicPartition) -> str:
    """The database name of a worker kind's offset in a partition."""
    return f"{kind}:{tp.topic}:{tp.partition}"


class StoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """A subscribed consumer that resumes from the offsets in the database. `drop` forgets what
    the worker built in memory since its last durable point."""

    def __init__(
        self,
        consumer: Any,
        sessions: sessionmaker[Session],
        *,
        kind: str,
        topic: str,
        drop: Callable[[], None],
    ) -> None:
        self.consumer = consumer
        self.sessions = sessions
        self.kind = kind
        self.drop = drop
        self.changed = False  # the assignment changed in a poll and nobody has rewound since
        self.rewinds = 0
        consumer.subscribe([topic], listener=self)

    # ---- rebalance callbacks: bookkeeping only -----------------------------------------------

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.changed = True

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.changed = True

    # ---- in the worker's step ----------------------------------------------------------------

    def poll(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        """One poll; nothing (after a rewind) if the assignment changed during it."""
        batch: dict[Any, list[Any]] = self.consumer.poll(
            timeout_ms=timeout_ms, max_records=max_records
        )
        if self.changed:
            self.rewind()
            return {}
        return batch

    def rewind(self) -> None:
        """Drop the worker's unsaved state and seek every assigned partition to its stored
        offset (its start if none is stored)."""
        self.drop()
        assigned = list(self.consumer.assignment())
        with self.sessions() as session:
            stored = {
                tp: store.stored_offset(session, name=offset_name(self.kind, tp)) for tp in assigned
            }
        for tp, offset in stored.items():
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        self.changed = False
        self.rewinds += 1
        log.debug("%s: rewound %s to the stored offsets", self.kind, assigned)
