"""The production path as processes: `dloop serve`, `join` and `learn` on a real broker and
Postgres (`Stack`; the `stack` fixture in tests/e2e/conftest.py starts one), and what the tests
read of it: counts in the database, the offsets a worker stored, the ends of a topic."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import create_engine, select

from service.storage.models import LogOffset

KEY = "prod-admin-key-0123456789abcdefghij"


HEADERS = {"Ocp-Apim-Subscription-Key": KEY}


ACTIONS = [{"id": f"a{i}", "features": [{"kind": f"k{i}"}]} for i in range(4)]


@dataclass
class Stack:
    url: str
    db_url: str
    env: dict[str, str]
    data_dir: Path
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def start(self, role: str, *args: str) -> None:
        # stderr to a file: an unread pipe would block a chatty process once it fills.
        with open(self.data_dir.parent / f"{role}.err", "a") as err:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", "service", *args],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )

    def stop(self, role: str, sig: int = signal.SIGTERM) -> str:
        proc = self.procs.pop(role)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return self.stderr(role)

    def stderr(self, role: str) -> str:
        path = self.data_dir.parent / f"{role}.err"
        return path.read_text() if path.exists() else ""

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers=HEADERS, timeout=10, **kw)


def count(db_url: str, stmt: Any) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(stmt) or 0)
    finally:
        engine.dispose()


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "", every: float = 0.3) -> Any:
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(every)
    return value


def stored_offsets(db_url: str, kind: str, topic: str) -> dict[int, int]:
    """The next offsets a `dloop join` or `dloop learn` stored with its data in Postgres, by
    partition (learners.join_worker.offset_name): what it resumes from after a restart."""
    prefix = f"{kind}:{topic}:"
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(LogOffset.name, LogOffset.offset).where(LogOffset.name.startswith(prefix))
            ).all()
    finally:
        engine.dispose()
    return {int(name.removeprefix(prefix)): offset for name, offset in rows}


def end_offsets(stack: Stack, topic: str) -> dict[int, int]:
    return topic_end_offsets(stack.env["DLOOP_KAFKA__BOOTSTRAP_SERVERS"], topic)


def topic_end_offsets(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """The topic's end offsets, for the partitions that hold any message. They are read from
    the high watermarks of fetch responses: Tansu's ListOffsets (KafkaConsumer.end_offsets)
    answers one past the first offset of a partition's last record batch, short of the end when
    that batch holds several records."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        for tp, listed in consumer.end_offsets(partitions).items():
            consumer.seek(tp, listed)  # at or before the end: little to fetch
        deadline = time.time() + 10
        while any(consumer.highwater(tp) is None for tp in partitions):
            assert time.time() < deadline, "no fetch response"
            consumer.poll(timeout_ms=200)
        ends = {tp.partition: consumer.highwater(tp) for tp in partitions}
    finally:
        consumer.close()
    return {p: end for p, end in ends.items() if end}


def caught_up(stack: Stack, kind: str, topic: str) -> bool:
    return caught_up_at(stack.db_url, stack.env["DLOOP_KAFKA__BOOTSTRAP_SERVERS"], kind, topic)


def caught_up_at(db_url: str, bootstrap_servers: str, kind: str, topic: str) -> bool:
    """The worker has stored offsets at the end of every partition of the topic: it has read
    and committed with its data everything published so far."""
    ends = topic_end_offsets(bootstrap_servers, topic)
    return bool(ends) and stored_offsets(db_url, kind, topic) == ends
