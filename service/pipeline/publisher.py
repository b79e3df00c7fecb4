"""Forward the local decision log to Kafka: the rank hot path never waits on the broker.

Every API replica appends records to its local log (a durable write-ahead buffer, as in
embedded mode). This thread publishes them to the events topic in log order with an idempotent
producer, and only after the broker acknowledged them (flush) moves its offset forward (an
atomically replaced file) and deletes the segments it no longer needs. While the broker is
away the log simply grows; the backlog is on /readyz and /metrics. A crash between the broker's
acknowledgement and the offset write republishes a few records: decisions are deduplicated by
eventId and observations by their uid downstream, so each is joined once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.core import record
from service.core.files import private_opener
from service.pipeline.background import keep_running
from service.storage.kafka import send_all
from service.storage.log import LocalLog

log = logging.getLogger("dloop.publisher")


class LogPublisher:
    def __init__(
        self,
        *,
        decision_log: LocalLog,
        make_producer: Callable[[], Any],
        topic: str,
        offset_path: Path,
        batch_bytes: int = 1 << 20,
        flush_timeout: float = 10.0,
    ) -> None:
        self.log = decision_log
        self.make_producer = make_producer
        self.topic = topic
        self.offset_path = offset_path
        self.batch_bytes = batch_bytes
        self.flush_timeout = flush_timeout
        self.offset = int(offset_path.read_text()) if offset_path.exists() else 0
        self.connected = False
        self._producer: Any = None
        self._stop = threading.Event()

    def run(self) -> None:
        # Broker away or restarting: the records stay in the local log, retried later.
        keep_running(
            self._stop,
            self.run_once,
            what="publishing",
            logger=log,
            idle=0.05,
            backoff=0.1,
            max_backoff=5.0,
            on_error=self._disconnect,
            traceback=False,
        )
        try:
            self.run_once()
        except Exception as exc:
            log.warning("final publish failed (%s); the records stay in the local log", exc)
        self._close_producer()

    def request_stop(self) -> None:
        self._stop.set()

    def run_once(self) -> bool:
        """Publish one batch; True if more is waiting."""
        if self._producer is None:
            # Connect before the first record arrives: a new idempotent producer takes seconds
            # on some brokers, and a replica's first reward must not reach the joiner after
            # its decision's wait window closed on another replica.
            self._producer = self.make_producer()
            self._producer.partitions_for(self.topic)  # topic metadata now, not at first send
            self.connected = True
        records, new_offset = self.log.read(self.offset, max_bytes=self.batch_bytes)
        if not records:
            return False
        keyed = [(record.partition_key(raw), raw) for raw in records]
        send_all(self._producer, self.topic, keyed, timeout=self.flush_timeout)
        self.connected = True
        self._save(new_offset)
        self.log.release(new_offset)
        return new_offset < self.log.end()

    def _save(self, offset: int) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        with open(tmp, "w", opener=private_opener) as f:
            f.write(str(offset))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.offset_path)
        self.offset = offset

    def _disconnect(self) -> None:
        self.connected = False
        self._close_producer()

    def _close_producer(self) -> None:
        if self._producer is not None:
            # Closing a producer whose broker is gone may raise; it is dropped either way.
            with contextlib.suppress(Exception):
                self._producer.close(timeout=1)
            self._producer = None
