"""How every dloop producer writes to Kafka (kafka-python, duck-typed here so the in-process
ranker can share it without the server's packages): its options, and sending a batch that
counts only once the broker acknowledged every message. service.storage.kafka builds the
server's producers with them; service.local, the in-process ranker's."""

from __future__ import annotations

from typing import Any

# Idempotent: acks from all replicas, retries without duplicates or reordering. Large batches:
# consumers decode record batches in Python, fewer is cheaper.
PRODUCER_OPTIONS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    "batch_size": 256 << 10,
    "max_in_flight_requests_per_connection": 5,
    "request_timeout_ms": 10_000,
}


def send_all(
    producer: Any, topic: str, messages: list[tuple[bytes, bytes]], *, timeout: float
) -> None:
    """Send (key, value) messages and return once the broker acknowledged every one; raises if
    any was refused or expired, so the caller does not move its own offset past them."""
    futures = [producer.send(topic, key=key, value=value) for key, value in messages]
    producer.flush(timeout=timeout)
    for future in futures:
        future.get(timeout=0)
